"""The project's YAML loader: aliases, duplicate keys and oversize input are refused, and every
failure is one short error naming the file, the line and the fix."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from dsanet import yamlio
from dsanet.yamlio import MAX_BYTES, StrictLoader, load_yaml_file, parse_yaml

LOADERS = sorted({StrictLoader, yamlio.LOADER}, key=lambda cls: cls.__name__)
SHIPPED = sorted(
    [*REPO.glob("dsanet/*/*.yaml"), *REPO.glob("search_spaces/*.yaml"), REPO / "tune/cluster.yaml"]
)
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)


@pytest.fixture(params=LOADERS, ids=lambda cls: cls.__name__, autouse=True)
def loader(request, monkeypatch):
    """Run each test with the pure-Python loader and, where PyYAML has it, the libyaml one."""
    monkeypatch.setattr(yamlio, "LOADER", request.param)
    return request.param


def write(tmp_path: Path, data: str | bytes, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_files_parse_as_safe_load_does(path: Path):
    assert load_yaml_file(path) == yaml.safe_load(path.read_text())


def test_plain_yaml_parses_as_safe_load_does():
    text = "a: 1\nb: [1.5, 'x', null, true]\nc: {d: 2001-12-14, e: 1e-5, f: 1.0e-5}\n"
    assert parse_yaml(text, "text") == yaml.safe_load(text)
    assert parse_yaml("", "text") is None


def test_alias_bomb_is_refused_at_once(tmp_path: Path):
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"x\.yaml: line 1, column 4: YAML anchors and aliases"):
        load_yaml_file(write(tmp_path, BOMB))
    assert time.monotonic() - start < 1


@pytest.mark.parametrize("text", ["a: &x 1\n", "a: 1\nb: *x\n", "- &y [1]\n"])
def test_anchors_and_aliases_are_refused(text: str):
    with pytest.raises(ValueError, match=r"write the value out"):
        parse_yaml(text, "text")


def test_duplicate_key_names_the_line_and_key(tmp_path: Path):
    path = write(tmp_path, "a: 1\nsearch:\n  optim.lr: 1\n  optim.lr: 2\n")
    with pytest.raises(
        ValueError,
        match=r"x\.yaml: line 4, column 3: key 'optim\.lr' is given twice \(first at "
        r"line 3\); keep one",
    ):
        load_yaml_file(path)


def test_non_utf8_byte_names_file_and_line(tmp_path: Path):
    path = write(tmp_path, b"a: 1\nb: caf\xe9\n")
    with pytest.raises(
        ValueError, match=r"x\.yaml: not UTF-8 text: byte 0xe9 at line 2 .*save the file as UTF-8"
    ):
        load_yaml_file(path)


def test_oversize_file_is_refused_unread(tmp_path: Path):
    path = write(tmp_path, "a: " + "x" * MAX_BYTES + "\n")
    with pytest.raises(ValueError, match=r"x\.yaml: larger than the 1024 KiB"):
        load_yaml_file(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a: {b: 1\n", r"text: not valid YAML; fix the syntax at line \d, column \d+: .*'\}'"),
        ("a: 1\n---\nb: 2\n", r"line 2, column 1: but found another document"),
        ("a: !!python/object:os.system x\n", r"line 1, column 4: could not determine a constr"),
        ("a: 1\nb: \x07\n", r"at line 2, column 4: unacceptable character #x0007"),
        ("a: 2001-13-45\n", r"cannot read '2001-13-45' \(month must be in 1\.\.12\)"),
        ("a: " + "9" * 5000 + "\n", r"cannot read '999.*\(Exceeds the limit"),
        ("[" * 100 + "]" * 100, r"nested more than 32 levels deep"),
        ("a: !" + "x" * 5000 + " 1\n", r"could not determine a constructor"),
    ],
)
def test_errors_are_one_short_line(text: str, match: str):
    with pytest.raises(ValueError, match=match) as info:
        parse_yaml(text, "text")
    assert len(str(info.value).splitlines()) == 1 and len(str(info.value)) < 300


def test_error_class_is_the_callers(tmp_path: Path):
    class Custom(ValueError):
        pass

    with pytest.raises(Custom, match=r"x\.yaml: not valid YAML"):
        load_yaml_file(write(tmp_path, "a: [1,\n"), Custom)
    with pytest.raises(Custom, match=r"^value: longer than"):
        parse_yaml("x" * (MAX_BYTES + 1), "value", Custom)


def test_lone_surrogate_in_text():
    with pytest.raises(ValueError, match=r"override: character 4 is not valid Unicode"):
        parse_yaml("[1,\udcff]", "override")


def test_unreadable_path_is_the_callers_error(tmp_path: Path):
    with pytest.raises(ValueError, match=r"cannot be read \(Is a directory\); check the path"):
        load_yaml_file(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_yaml_file(tmp_path / "missing.yaml")
