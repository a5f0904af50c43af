"""The bytes of mitmproxy flow files (`-w`, `mitmweb -r`): a flow's state as a tnetstring.

`dumps` writes exactly what mitmproxy's `tnetstring.dumps` (and so `mitmproxy.io.FlowWriter`) writes
for the same state, dict items last-first as mitmproxy orders them: in C (jitgate.recording._encode,
a twentieth of mitmproxy's time for a call's state) or, where that is not built or a value is of
another type, `py_dumps` (half of mitmproxy's time: one call per value, no deque). `flow_pieces`
puts a flow's state together with connection parts made once per connection, its bodies not
copied. tests/test_recording_files.py checks all three against mitmproxy's own writer.

Plain Python (no mitmproxy).
"""

from __future__ import annotations

try:
    from jitgate.recording._encode import tnetstring as _c_tnetstring
except ImportError:  # not built (no compiler where it was installed): Python alone, slower
    _c_tnetstring = None


def dumps(value) -> bytes:
    if _c_tnetstring is not None:
        data = _c_tnetstring(value)
        if data is not None:
            return data
    return py_dumps(value)


def py_dumps(value) -> bytes:
    kind = type(value)
    if kind is bytes:
        return b"%d:%s," % (len(value), value)
    if kind is str:
        data = value.encode()
        return b"%d:%s;" % (len(data), data)
    if value is None:
        return b"0:~"
    if kind is dict:
        body = b"".join([py_dumps(k) + py_dumps(v) for k, v in reversed(value.items())])
        return b"%d:%s}" % (len(body), body)
    if kind is list or kind is tuple:
        body = b"".join([py_dumps(v) for v in value])
        return b"%d:%s]" % (len(body), body)
    if kind is bool:
        return b"4:true!" if value else b"5:false!"
    if kind is int:
        data = b"%d" % value
        return b"%d:%s#" % (len(data), data)
    if kind is float:
        data = repr(value).encode()
        return b"%d:%s^" % (len(data), data)
    return _general(value)


def _general(value) -> bytes:
    """Subclasses of the plain types, in the order mitmproxy's tnetstring tests them."""
    if value is True or value is False:
        return py_dumps(bool(value))
    if isinstance(value, int):
        return py_dumps(int(value))
    if isinstance(value, float):
        return py_dumps(float(value))
    if isinstance(value, bytes):
        return py_dumps(bytes(value))
    if isinstance(value, str):
        return py_dumps(value.encode().decode())
    if isinstance(value, (list, tuple)):
        return py_dumps(list(value))
    if isinstance(value, dict):
        return py_dumps(dict(value))
    raise ValueError(f"unserializable object: {value!r} ({type(value)})")


PIECE_MIN = 4096  # bytes values at least this long (bodies) are written from where they are, not copied


def _pieces(value) -> list[bytes]:
    if _c_tnetstring is not None:
        pieces = _c_tnetstring(value, PIECE_MIN)
        if pieces is not None:
            return pieces
    return [py_dumps(value)]


def flow_pieces(state: dict, parts: dict[str, bytes]) -> list[bytes]:
    """A flow state's tnetstring as pieces to write one after the other (os.writev), with the values
    of `parts`' keys already serialized (the connections): the bodies are pieces of their own, never
    copied; the small pieces between them are joined."""
    out: list[bytes] = []
    run: list[bytes] = []
    for key, value in reversed(state.items()):
        run.append(dumps(key))
        for piece in ([parts[key]] if key in parts else _pieces(value)):
            if len(piece) >= PIECE_MIN:
                out += (b"".join(run), piece)
                run = []
            else:
                run.append(piece)
    out.append(b"".join(run))
    return [b"%d:" % sum(map(len, out)), *out, b"}"]


def complete_length(read, size: int) -> int:
    """The length of the complete flows at the start of a flow file of `size` bytes (`read(n, offset)`
    reads it): where a write cut short by a kill left part of one, the rest is to be dropped."""
    pos = 0
    while pos < size:
        head = read(21, pos)
        colon = head.find(b":")
        if colon <= 0 or not head[:colon].isdigit():
            return pos
        end = pos + colon + 1 + int(head[:colon])
        if end >= size or read(1, end) != b"}":
            return pos
        pos = end + 1
    return pos
