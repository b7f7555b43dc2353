"""docs/DESIGN.md §12 stays true: every line it cites uses the private name it lists there."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _private_uses_table() -> list[tuple[str, list[int], set[str]]]:
    """(file, cited lines, private names) per row of DESIGN §12's table."""
    text = (REPO / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    section = text.split("## 12.", 1)[1]
    rows = []
    for line in section.splitlines():
        cells = line.split(" | ")
        found = re.match(r"\| `(tune/\w+\.py):(\d+)(?:–(\d+))?`", line)
        if not found:
            continue
        path, first, last = found.group(1), int(found.group(2)), int(found.group(3) or 0)
        lines = list(range(first, (last or first) + 1))
        lines += [int(n) for n in re.findall(r"`:(\d+)`", cells[0])]
        names = set(re.findall(r"(_\w+)", cells[1])) | set(
            re.findall(r"`([\w.]+_internal[\w.]*)`", cells[1])
        )
        rows.append((path, lines, names))
    return rows


def test_every_cited_line_uses_a_listed_private_name():
    rows = _private_uses_table()
    assert len(rows) >= 5
    for path, lines, names in rows:
        source = (REPO / path).read_text(encoding="utf-8").splitlines()
        for number in lines:
            assert any(name in source[number - 1] for name in names), (path, number, names)
