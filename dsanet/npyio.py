"""Reading .npy files from others: no pickle code runs, headers are checked before any data is read.

`load_object_list` maps the few globals np.save writes for an object array to checked stand-ins
(no real numpy call sees the file's arguments); `open_npy` reads numeric arrays with pickle off,
once the header's shape and dtype match the bytes the file holds.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dsanet.errors import brief

ZIP_MAGIC = b"PK\x03\x04"  # what an .npz (a zip archive) starts with
NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats
# dtype specs np.dtype.__reduce__ writes for object, bool, int, float and str items
DTYPE_SPEC = re.compile(r"O[48]|b1|[iu][1248]|f[248]|U[0-9]{1,6}")
GT_FIX = "re-download the VadCLIP lists from a source you trust"
CODE_WARNING = "this file asks to run code"
OBJECT_LIST_FORM = (
    "a 1-D object array holding one list per test video, as VadCLIP's gt_segment.npy "
    "([[start, end], ...]) and gt_label.npy ([label, ...]) are"
)
# What a broken pickle stream can raise while it is read, besides a refused global.
_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    OverflowError,
    struct.error,
    RecursionError,
    MemoryError,
)
_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for something np.save never writes for an object array; it was not run.

    `asked` says what, in a few bounded quotes (`brief`).
    """

    def __init__(self, asked: str) -> None:
        super().__init__(asked)
        self.asked = asked


class _NdarrayToken:
    """Stands for `numpy.ndarray`, which np.save's pickle only passes to `_reconstruct`.

    Calling the real class with a buffer and dtype object would read pointers from the file.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "numpy.ndarray"

    def __call__(self, *args: Any) -> None:
        raise _RefusedGlobal(f"numpy.ndarray{brief(args)}")


_NDARRAY = _NdarrayToken()


class _DtypeStub:
    """Stands for `numpy.dtype(spec)`: plain object, bool, int, float and str kinds only."""

    def __init__(self, spec: Any, *_flags: Any) -> None:
        if not isinstance(spec, str) or not DTYPE_SPEC.fullmatch(spec):
            raise _RefusedGlobal(f"numpy.dtype({brief(spec)})")
        self.spec, self.order = spec, "|"

    def __repr__(self) -> str:
        return f"numpy.dtype({self.spec!r})"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise _RefusedGlobal(f"a numpy.dtype state {brief(state)}")
        self.order = state[1]

    def resolve(self) -> np.dtype:
        dtype = np.dtype(self.spec)
        return dtype.newbyteorder(self.order) if self.order in "<>" else dtype


class _ObjectArrayStub:
    """Stands for an object ndarray until its state, a plain list of items, arrives."""

    items: list | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise _RefusedGlobal(f"an ndarray state {brief(state)}")
        _version, shape, dtype, _fortran, items = state
        if not (isinstance(dtype, _DtypeStub) and dtype.spec[0] == "O" and isinstance(items, list)):
            raise _RefusedGlobal(f"an ndarray state {brief(state)}")
        if shape != (len(items),):
            raise _RefusedGlobal(f"an ndarray of shape {brief(shape)} from {len(items)} items")
        self.items = items


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _ObjectArrayStub:
    if subtype is not _NDARRAY or shape != (0,) or typecode != b"b":
        raise _RefusedGlobal(f"_reconstruct{brief((subtype, shape, typecode))}")
    return _ObjectArrayStub()


def _scalar(dtype: Any, data: Any = None) -> Any:
    """A numpy scalar from its raw bytes; object-dtype scalars are refused."""
    if not isinstance(dtype, _DtypeStub) or dtype.spec[0] == "O" or not isinstance(data, bytes):
        raise _RefusedGlobal(f"numpy scalar{brief((dtype, data))}")
    resolved = dtype.resolve()
    if len(data) != resolved.itemsize:
        raise _RefusedGlobal(f"a {resolved.str} scalar from {len(data)} bytes")
    return np.frombuffer(data, dtype=resolved)[0]


# What np.save's pickle of an object array names, under numpy 1 and 2 module names, mapped to
# the stand-ins above: no numpy internals are imported or called with the file's arguments.
_ALLOWED = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeStub,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that resolves np.save's object-array globals to checked stand-ins only."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _RefusedGlobal(brief(f"{module}.{name}")) from None


def _fail(what: str, path: Path, reason: str, fix: str) -> ValueError:
    return ValueError(f"{what} {path} {reason}; {fix}")


def _open(path: Path, what: str, fix: str) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as exc:
        raise _fail(what, path, f"cannot be opened ({exc.strerror})", fix) from exc


def _read_header(
    handle: BinaryIO, path: Path, what: str, fix: str
) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the magic string and header; no array data is read."""
    if handle.read(len(ZIP_MAGIC)) == ZIP_MAGIC:
        reason = "is a zip archive (an .npz?), not a .npy array; save each array with np.save"
        raise _fail(what, path, reason, fix)
    handle.seek(0)
    try:
        version = np.lib.format.read_magic(handle)
        if version not in _HEADER_READERS:
            raise ValueError(f".npy format version {version} is not 1.0 or 2.0")
        shape, _fortran_order, dtype = _HEADER_READERS[version](handle)
    except (ValueError, RecursionError, MemoryError) as exc:
        raise _fail(what, path, f"cannot be read as .npy ({brief(str(exc))})", fix) from exc
    return shape, dtype


def _check_numeric(shape: tuple[int, ...], dtype: np.dtype, path: Path, what: str, fix: str):
    if dtype.hasobject:
        reason = "holds Python objects (dtype object), which only pickle can read; expected numbers"
        raise _fail(what, path, reason, fix)
    if dtype.kind not in NUMERIC_KINDS:
        reason = f"has dtype {brief(dtype.str)}; expected a float, int or bool array"
        raise _fail(what, path, reason, fix)
    if any(n < 0 for n in shape):
        raise _fail(what, path, f"has a negative shape {brief(shape)} in its header", fix)


def _check_size(shape, dtype: np.dtype, data_bytes: int, path: Path, what: str, fix: str):
    """The bytes after the header must be exactly shape x itemsize: no more, no less."""
    need = math.prod(shape) * dtype.itemsize
    layout = f"shape {brief(shape)}, dtype {dtype.str}"
    if data_bytes < need:
        reason = f"is truncated: {data_bytes} bytes of {need} after its header ({layout})"
        raise _fail(what, path, reason, fix)
    if data_bytes > need:
        reason = f"has {data_bytes} bytes after its header, which describes {need} ({layout})"
        raise _fail(what, path, reason, fix)


def check_npy(path: Path, *, what: str, fix: str) -> tuple[tuple[int, ...], np.dtype]:
    """Check a numeric .npy from its header and size alone; returns (shape, dtype).

    `what` names the file in messages ("feature file"), `fix` says what to do about it.
    """
    with _open(path, what, fix) as handle:
        shape, dtype = _read_header(handle, path, what, fix)
        offset = handle.tell()
        size = handle.seek(0, io.SEEK_END)
    _check_numeric(shape, dtype, path, what, fix)
    _check_size(shape, dtype, size - offset, path, what, fix)
    return shape, dtype


def open_npy(path: Path, *, what: str, fix: str, mmap_mode: str | None = None) -> np.ndarray:
    """A numeric .npy that passed `check_npy`, read with pickle off (memory-mapped if asked)."""
    check_npy(path, what=what, fix=fix)
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise _fail(what, path, f"cannot be read as .npy ({brief(str(exc))})", fix) from exc


def _unpickle(data: bytes, path: Path, what: str, fix: str) -> Any:
    try:
        return _ArrayUnpickler(io.BytesIO(data)).load()
    except _RefusedGlobal as exc:
        reason = (
            f"was refused: its pickle asks for {exc.asked}, which np.save never writes "
            f"for a list of ground truth; nothing in the file was run"
        )
        raise _fail(what, path, reason, f"{fix}; {CODE_WARNING}") from exc
    except _PICKLE_ERRORS as exc:
        reason = f"has damaged pickled data ({type(exc).__name__}: {brief(str(exc))})"
        raise _fail(what, path, reason, fix) from exc


def _check_object_header(shape: tuple[int, ...], dtype: np.dtype, path: Path, what, fix):
    if dtype.kind != "O" or len(shape) != 1:
        layout = f"a {dtype.str} array of shape {brief(shape)}"
        raise _fail(what, path, f"holds {layout}; expected {OBJECT_LIST_FORM}", fix)


def load_object_list(path: Path, *, what: str = "gt file", fix: str = GT_FIX) -> list:
    """The entries of a 1-D object .npy (VadCLIP's gt lists), unpickled without running code."""
    with _open(path, what, fix) as handle:
        shape, dtype = _read_header(handle, path, what, fix)
        _check_object_header(shape, dtype, path, what, fix)
        array = _unpickle(handle.read(), path, what, fix)
    items = array.items if isinstance(array, _ObjectArrayStub) else None
    if items is None or (len(items),) != shape:
        found = f"{len(items)} items" if items is not None else f"a {type(array).__name__}"
        reason = f"unpickles to {found}, not the object array of shape {shape} of its header"
        raise _fail(what, path, reason, fix)
    return list(items)
