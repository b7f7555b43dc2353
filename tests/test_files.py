"""dsanet.files: the one atomic writer and the hard-link helpers; dsanet.errors.redact."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from dsanet.errors import redact
from dsanet.files import (
    TMP_GLOB,
    link_atomic,
    link_or_copy,
    remove_stale,
    replace_atomic,
    temporary,
    write_atomic,
)


def test_write_atomic_replaces_text_and_bytes_and_leaves_no_temporary(tmp_path: Path):
    path = tmp_path / "state.json"
    write_atomic(path, "first ✓")
    write_atomic(path, "second ✓")
    assert path.read_text(encoding="utf-8") == "second ✓"
    write_atomic(path, b"\x00\xff")
    assert path.read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path):
    path = tmp_path / "best.pt"
    path.write_text("old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomic(path, fail)
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]


def test_remove_stale_removes_what_a_killed_writer_left_only(tmp_path: Path):
    kept = tmp_path / "config.yaml"
    kept.write_text("kept")
    stale = temporary(kept).with_name(".config.yaml.tmp-999999")
    stale.write_text("half")
    assert stale.match(TMP_GLOB) and temporary(kept).match(TMP_GLOB)
    remove_stale(tmp_path)
    assert sorted(tmp_path.iterdir()) == [kept]


def test_link_atomic_replaces_the_target_with_a_link(tmp_path: Path):
    source, target = tmp_path / "a.pt", tmp_path / "b.pt"
    source.write_bytes(b"weights")
    target.write_bytes(b"older")
    assert link_atomic(source, target) and target.samefile(source)
    assert not link_atomic(tmp_path / "missing.pt", target) and target.samefile(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]


def test_link_or_copy_makes_a_new_name(tmp_path: Path):
    source, target = tmp_path / "a.pt", tmp_path / "b.pt"
    source.write_bytes(b"weights")
    link_or_copy(source, target)
    assert target.read_bytes() == b"weights" and os.stat(target).st_nlink == 2


# The two regexes that redact replaced (the plan's and the MLflow tracker's, which differed):
# whatever either masked, redact masks too.
_OLD = (r"(\w+://)[^/@\s]+@", r"(\w+://)[^/@\s'\"]+@")

URIS = [
    ("http://alice:s3cret@mlflow.example:5000", "s3cret"),
    ("postgresql+psycopg2://bob:pw0rd@db:5432/mlflow", "pw0rd"),
    ("https://token123@host/path", "token123"),
    ("mysql://u:p@ss@db/x", "p@ss"),  # an unescaped @ in the password
    ("http://u:it's@host", "it's"),  # a quote in the password
    ("tracking_uri: 'http://u:quoted@host:5000'  # admin@example.org", "quoted"),
    ('{"uri": "https://u:injson@h"}', "injson"),
    ("mysql://db/x?user=u&password=hunter2&ssl=1", "hunter2"),
    ("https://h/api?api_key=abcdef", "abcdef"),
    ("https://h/?X-Amz-Signature=0badc0de&X-Amz-Credential=AKIAXYZ", "0badc0de"),
]


@pytest.mark.parametrize(("text", "secret"), URIS)
def test_redact_masks_credentials(text: str, secret: str):
    masked = redact(text)
    assert secret not in masked and "***" in masked
    for old in _OLD:  # at least as strict as both regexes it replaces
        before = re.sub(old, r"\1***@", text)
        assert set(re.findall(r"\w+", masked)) <= set(re.findall(r"\w+", before)) | {"***"}


def test_redact_keeps_what_is_not_a_secret():
    for text in (
        "sqlite:////home/me/study/mlflow.db",
        "http://mlflow.example:5000",
        "file:///data/mlartifacts",
        "mail me at someone@example.org",
        "https://host/a@b/c?user=x&page=2",
    ):
        assert redact(text) == text
    assert redact("http://a:b@h and http://c:d@k") == "http://***@h and http://***@k"
    assert redact("https://h/x?token=t1&page=2") == "https://h/x?token=***&page=2"
