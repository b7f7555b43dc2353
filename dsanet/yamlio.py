"""YAML from others: the one place the project parses YAML, with anchors, aliases, duplicate keys,
deep nesting and oversize input refused, and every failure one short error naming where it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node
from yaml.resolver import Resolver

from dsanet.errors import brief, decode_utf8

try:  # libyaml scans and parses five times faster; the composing and building stay ours
    from yaml.cyaml import CParser
except ImportError:  # PyYAML built without libyaml
    CParser = None

MAX_BYTES = 1 << 20  # a config, space or dataset YAML is a few KiB
MAX_DEPTH = 32  # nesting levels; the project's files use at most five
ALIAS_REFUSED = "YAML anchors and aliases (&name / *name) are not accepted; write the value out"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_PROBLEM_LIMIT = 160  # characters of PyYAML's own description an error message keeps


class _Refused(yaml.YAMLError):
    """Valid YAML this project does not accept; `text` says what and how to fix it."""

    def __init__(self, text: str, mark: Any) -> None:
        super().__init__(text)
        self.text, self.mark = text, mark


class _Strict:
    """Composer and constructor rules shared by the pure-Python and the libyaml loader."""

    _depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()
        if isinstance(event, AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(ALIAS_REFUSED, event.start_mark)  # before anything is expanded
        if self._depth >= MAX_DEPTH:
            raise _Refused(
                f"nested more than {MAX_DEPTH} levels deep; flatten the structure",
                event.start_mark,
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, MappingNode):
            self._check_unique_keys(node)
        return super().construct_mapping(node, deep=deep)

    def _check_unique_keys(self, node: MappingNode) -> None:
        first_seen: dict[Any, Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = first_seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the constructor reports it next
                continue
            if first is not key_node:
                raise _Refused(
                    f"key {brief(key)} is given twice (first at line "
                    f"{first.start_mark.line + 1}); keep one of them",
                    key_node.start_mark,
                )

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:  # e.g. 2001-13-45, or an int of 5000 digits
            reason = str(exc).split(";")[0].split(":")[0]
            raise ConstructorError(
                None, None, f"cannot read {brief(node.value)} ({reason})", node.start_mark
            ) from exc


class StrictLoader(_Strict, yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses anchors, aliases, duplicate keys and deep nesting."""


if CParser is not None:

    class _FastStrictLoader(_Strict, Composer, CParser, SafeConstructor, Resolver):
        """StrictLoader on libyaml's scanner and parser; Composer comes first, so it composes."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

    LOADER: type = _FastStrictLoader
else:
    LOADER = StrictLoader


def load_yaml_file(path: str | Path, error: type[Exception] = ValueError) -> Any:
    """The parsed content of the YAML file `path` (None if empty); any problem is one `error`.

    A missing file stays a FileNotFoundError, for callers that offer alternatives.
    """
    path = Path(path)
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:  # a folder, no permission, a name too long, an I/O error
        raise error(
            f"{path}: cannot be read ({exc.strerror or exc}); check the path and its permissions"
        ) from exc
    if len(data) > MAX_BYTES:
        raise error(
            f"{path}: larger than the {MAX_BYTES // 1024} KiB a YAML file here may hold "
            f"(a config or search space is a few KiB); check that this is the right file"
        )
    return _parse(decode_utf8(data, str(path), error), str(path), error)


def parse_yaml(text: str, source: str, error: type[Exception] = ValueError) -> Any:
    """`text` parsed as YAML, e.g. a command-line value; `source` names it in errors."""
    if len(text) > MAX_BYTES:
        raise error(f"{source}: longer than {MAX_BYTES} characters; shorten it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. a non-UTF-8 command line
        raise error(
            f"{source}: character {exc.start + 1} is not valid Unicode; write the text as UTF-8"
        ) from exc
    return _parse(text, source, error)


def _parse(text: str, source: str, error: type[Exception]) -> Any:
    try:
        loader = LOADER(text)  # the pure-Python reader checks the characters here
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise error(f"{source}: {_describe(exc, text)}") from exc


def _describe(exc: yaml.YAMLError, text: str) -> str:
    """One line: where in `text` the YAML error lies, what it is, and the fix."""
    if isinstance(exc, _Refused):
        return f"{_at(exc.mark, text)}: {exc.text}"
    if isinstance(exc, yaml.reader.ReaderError):
        position = exc.position
        if exc.encoding != "unicode":  # libyaml counts UTF-8 bytes
            position = len(text.encode("utf-8")[:position].decode("utf-8", "ignore"))
        line = text.count("\n", 0, position) + 1
        column = position - text.rfind("\n", 0, position)
        where = f"line {line}, column {column}"
        problem = f"unacceptable character #x{exc.character:04x}: {exc.reason}"
    elif isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = _at(mark, text) if mark is not None else "an unknown place"
        problem = exc.problem or exc.context or type(exc).__name__
        if exc.context and exc.problem:
            problem += f" ({exc.context}{_also_at(exc.context_mark, mark)})"
    else:
        where, problem = "an unknown place", str(exc)
    problem = " ".join(problem.split())
    if len(problem) > _PROBLEM_LIMIT:
        problem = problem[: _PROBLEM_LIMIT - 1] + "…"
    return f"not valid YAML; fix the syntax at {where}: {problem}"


def _at(mark: Any, text: str) -> str:
    """'line L, column C' of `mark`; the end of the text where libyaml points past it."""
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    if mark.line < len(lines) or not lines:
        return f"line {mark.line + 1}, column {mark.column + 1}"
    return f"line {len(lines)}, column {len(lines[-1]) + 1}"


def _also_at(context_mark: Any, problem_mark: Any) -> str:
    if context_mark is None or problem_mark is None or context_mark.line == problem_mark.line:
        return ""
    return f" at line {context_mark.line + 1}"
