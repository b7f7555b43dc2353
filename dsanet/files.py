"""Files replaced whole: a kill or a full disk at any moment leaves the old file or the new one.

A file is written to a temporary sibling, `.<name>.tmp-<pid>`, then renamed over its name (one
`os.replace` on the same filesystem). A hard link made the same way gives one file several
names: dsanet writes a file once and only ever replaces it whole, so names sharing its inode
never see a change.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_GLOB = ".*.tmp-*"  # what a kill in the middle of a write leaves; one writer owns a folder


def temporary(path: Path) -> Path:
    """The temporary sibling a write of `path` by this process goes through."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def replace_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` to the temporary sibling, then rename it over `path`; on any failure the
    temporary file is removed and `path` is as it was."""
    tmp = temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` by `data` (text as UTF-8, or bytes) in one rename."""
    if isinstance(data, bytes):
        replace_atomic(path, lambda tmp: tmp.write_bytes(data))
    else:
        replace_atomic(path, lambda tmp: tmp.write_text(data, encoding="utf-8"))


def remove_stale(folder: Path) -> None:
    """Remove temporary files a killed writer left in `folder` (it must be this folder's only
    writer)."""
    for stale in folder.glob(TMP_GLOB):
        stale.unlink(missing_ok=True)


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


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link to `source` at `target` (a new name); a copy where links cannot be made."""
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not supported
        shutil.copy2(source, target)


def json_text(obj: Any) -> str:
    """Strict JSON (no NaN or Infinity, which are not JSON and other readers refuse): a
    non-finite number is written as null; numpy and torch scalars as plain numbers."""
    return json.dumps(_finite_or_null(obj), indent=1, allow_nan=False)


def _finite_or_null(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    value = float(obj)
    return value if math.isfinite(value) else None
