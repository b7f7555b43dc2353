"""npyio: object lists load as numpy writes them, run no code, and reach no numpy internals.

Numeric arrays are refused from their header (kind, size) before any data is read.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_DATA

from dsanet.npyio import load_object_list, open_npy

REAL_GT = ["xd/gt_segment.npy", "xd/gt_label.npy", "ucf/gt_segment_ucf.npy", "ucf/gt_label_ucf.npy"]
FIX = "re-extract it"


def _object_array(entries: list) -> np.ndarray:
    array = np.empty(len(entries), dtype=object)
    for index, entry in enumerate(entries):
        array[index] = entry
    return array


def _save_raw_pickle(path: Path, payload: bytes, shape: tuple[int, ...] = (1,)) -> Path:
    """An object-array .npy header followed by `payload` as its pickle stream."""
    with path.open("wb") as handle:
        header = {"descr": "|O", "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(payload)
    return path


class _Reduces:
    """Pickles as a call of `func(*args)`, with an optional state passed to __setstate__."""

    def __init__(self, func, args: tuple, state=None) -> None:
        self.reduced = (func, args) if state is None else (func, args, state)

    def __reduce__(self):
        return self.reduced


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"needs VadCLIP's lists in {REAL_DATA}")
@pytest.mark.parametrize("name", REAL_GT)
def test_shipped_gt_files_load_as_numpy_reads_them(name):
    path = REAL_DATA / name
    assert load_object_list(path) == list(np.load(path, allow_pickle=True))


def test_object_lists_numpy_writes_load_unchanged(tmp_path):
    entries = [
        [["157", "180"], [0, 1600]],
        [],
        [[np.int64(3), np.uint16(9)], [np.array([7], ">i4")[0], np.int8(-1)]],
        [np.str_("B1"), "G", np.float32(0.5), np.bool_(True)],
    ]
    path = tmp_path / "gt.npy"
    np.save(path, _object_array(entries), allow_pickle=True)
    loaded = load_object_list(path)
    assert loaded == list(np.load(path, allow_pickle=True))
    assert type(loaded[2][1][0]) is np.int32 and loaded[2][1][0] == 7


def _numpy_internal_abuse() -> dict[str, object]:
    """Calls numpy would run with the file's arguments: the first three read pointers from its
    bytes, the last two rebuild kinds no gt list holds."""
    reconstruct = np.ndarray.__reduce__(np.empty(1, object))[0]
    scalar = np.int64(0).__reduce__()[0]
    pointer = b"\x41" * 8
    return {
        "object ndarray over a buffer": _Reduces(np.ndarray, ((1,), np.dtype(object), pointer)),
        "object state from bytes": _Reduces(
            reconstruct, (np.ndarray, (0,), b"b"), (1, (1,), np.dtype(object), False, pointer)
        ),
        "object scalar from bytes": _Reduces(scalar, (np.dtype(object), pointer)),
        "structured dtype with objects": np.dtype([("a", "O")]),
        "numeric array inside": np.zeros(3),
    }


@pytest.mark.parametrize("case", list(_numpy_internal_abuse()))
def test_numpy_internals_never_see_the_files_arguments(tmp_path, case):
    # Never np.load these: numpy would dereference 0x4141414141414141.
    path = tmp_path / "gt.npy"
    np.save(path, _object_array([[_numpy_internal_abuse()[case]]]), allow_pickle=True)
    with pytest.raises(ValueError, match=r"gt.npy was refused: its pickle asks for .*run code"):
        load_object_list(path)


def test_refused_global_is_quoted_briefly(tmp_path):
    name = "x" * 10_000
    path = _save_raw_pickle(tmp_path / "gt.npy", f"c{name}\n{name}\n.".encode())
    with pytest.raises(ValueError, match="was refused") as refused:
        load_object_list(path)
    assert len(str(refused.value)) < 500


def _deeply_nested() -> bytes:
    return b"\x80\x02" + b"(" * 100_000 + b"l" * 100_000 + b"."


BROKEN = {
    "empty": (b"", "has damaged pickled data"),
    "truncated": (pickle.dumps(_object_array([["a"]]), protocol=3)[:-9], "has damaged pickled"),
    "garbage": (b"\x80\x04garbage", "has damaged pickled data"),
    "dict at top level": (pickle.dumps({"a": 1}), r"unpickles to a dict, not the object array"),
    "deep nesting": (_deeply_nested(), "unpickles to a list, not the object array"),
    "shape unlike header": (pickle.dumps(_object_array([[], []])), "unpickles to 2 items, not"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_pickles_are_one_value_error_naming_the_file(tmp_path, case):
    payload, message = BROKEN[case]
    path = _save_raw_pickle(tmp_path / "gt.npy", payload)
    with pytest.raises(ValueError, match=f"gt file {re.escape(str(path))} {message}"):
        load_object_list(path)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 3), np.float32),
        np.zeros((4, 3), np.float16),
        np.arange(12, dtype=">i8").reshape(4, 3),
        np.ones((2, 2), np.uint8),
        np.ones(5, bool),
        np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        np.zeros((0, 512), np.float32),
    ],
)
def test_numeric_arrays_open_as_np_load_reads_them(tmp_path, array):
    path = tmp_path / "a.npy"
    np.save(path, array)
    np.testing.assert_array_equal(open_npy(path, what="f", fix=FIX), array)
    mapped = open_npy(path, what="f", fix=FIX, mmap_mode="r")
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, array)


def _header_then(shape, descr: str, data: bytes) -> bytes:
    handle = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(handle, header)
    return handle.getvalue() + data


def _saved(array: np.ndarray, **kwargs) -> bytes:
    handle = io.BytesIO()
    np.save(handle, array, **kwargs)
    return handle.getvalue()


REFUSED = {
    "npz": (lambda: _zip_bytes(), r"is a zip archive \(an .npz\?\)"),
    "objects": (lambda: _saved(_object_array([[1]]), allow_pickle=True), "holds Python objects"),
    "strings": (lambda: _saved(np.array(["ab"])), "has dtype '<U2'"),
    "bytes": (lambda: _saved(np.array([b"ab"])), "has dtype '|S2'"),
    "structured": (lambda: _saved(np.zeros(2, "i4,f4")), "has dtype '|V8'"),
    "datetimes": (lambda: _saved(np.zeros(2, "M8[s]")), "has dtype '<M8"),
    "complex": (lambda: _saved(np.zeros(2, complex)), "has dtype '<c16'"),
    "petabyte header": (
        lambda: _header_then((2**40, 256), "<f4", bytes(64)),
        r"is truncated: 64 bytes of 1125899906842624 after its header \(shape \(1099511627776, ",
    ),
    "truncated": (
        lambda: _saved(np.zeros((4, 3), np.float32))[:-8],
        "is truncated: 40 bytes of 48",
    ),
    "bytes past the data": (
        lambda: _saved(np.zeros(3, np.float32)) + b"tail",
        "has 16 bytes after its header, which describes 12",
    ),
    "negative shape": (
        lambda: _header_then((-1, 4), "<f4", b""),
        r"has a negative shape \(-1, 4\)",
    ),
    "not npy": (
        lambda: b"<html>404</html>",
        r"cannot be read as .npy \(.the magic string is not correct",
    ),
    "short": (lambda: b"\x93NU", "cannot be read as .npy"),
    "version 3 header": (
        lambda: b"\x93NUMPY\x03\x00" + bytes(8),
        r"cannot be read as .npy \('.npy format version \(3, 0\) is not 1.0 or 2.0'\)",
    ),
    "header not a dict": (
        lambda: b"\x93NUMPY\x01\x00\x10\x00" + b"[1, 2]".ljust(15) + b"\n",
        "cannot be read as .npy",
    ),
}


def _zip_bytes() -> bytes:
    handle = io.BytesIO()
    np.savez(handle, a=np.zeros(3))
    return handle.getvalue()


@pytest.mark.parametrize("case", list(REFUSED))
def test_numeric_reader_refuses_from_the_header(tmp_path, case):
    make, message = REFUSED[case]
    path = tmp_path / "a.npy"
    path.write_bytes(make())
    with pytest.raises(
        ValueError, match=f"feature file {re.escape(str(path))} ({message}).*; {FIX}$"
    ):
        open_npy(path, what="feature file", fix=FIX)


def test_missing_file_is_a_value_error_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"a.npy cannot be opened \(No such file.*; re-extract it"):
        open_npy(tmp_path / "a.npy", what="feature file", fix=FIX)
