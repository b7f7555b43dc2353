"""Hard links that replace a file atomically: one copy of a study's weights under several names.

dsanet writes a `.pt` file once and only ever replaces it whole, so the names sharing its inode
never see a change.
"""

from __future__ import annotations

import os
from pathlib import Path


def link_atomic(source: Path, target: Path) -> bool:
    """Make `target` a hard link to `source`, replacing any file there in one rename. False,
    with nothing changed, where links cannot be made (another filesystem, not supported)."""
    tmp = target.with_name(f".{target.name}.link-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
    except OSError:
        return False
    os.replace(tmp, target)
    return True
