"""Files that hold secrets or evidence (audit log, grant store): private from the start."""

from __future__ import annotations

import os
from pathlib import Path


def make_private_dirs(directory: Path) -> None:
    """Create `directory` and its missing parents with mode 0700 (`os.makedirs` would give the
    parents the default mode)."""
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass  # created meanwhile by another process; a non-directory fails the open
