"""Sessions of revisions 2025-03-26..2025-11-25, bound to the caller who opened them.

The server sees only the front (the caller's token never reaches it), so it cannot tell callers apart:
whoever presents a session id would be in that session. The front binds each `Mcp-Session-Id` an
`initialize` answer hands out to the caller and server it was made for; a request naming a session
the front did not see opened (another caller's, a guessed one, one from before the front restarted)
is answered 404, which tells an MCP client to start a new session. DELETE ends the binding.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class SessionBindings:
    def __init__(self, max_sessions: int = 100_000, idle_timeout: float = 24 * 3600,
                 now: Callable[[], float] = time.monotonic) -> None:
        self._owners: OrderedDict[str, tuple[str, str, float]] = OrderedDict()
        self._max = max_sessions
        self._idle = idle_timeout
        self._now = now

    def bind(self, session_id: str, server: str, username: str) -> None:
        self._owners[session_id] = (server, username, self._now())
        self._owners.move_to_end(session_id)
        while len(self._owners) > self._max:
            self._owners.popitem(last=False)

    def allows(self, session_id: str, server: str, username: str) -> bool:
        owner = self._owners.get(session_id)
        if owner is None or owner[:2] != (server, username):
            return False
        if self._now() - owner[2] > self._idle:
            del self._owners[session_id]
            return False
        self._owners[session_id] = (server, username, self._now())
        self._owners.move_to_end(session_id)
        return True

    def end(self, session_id: str) -> None:
        self._owners.pop(session_id, None)
