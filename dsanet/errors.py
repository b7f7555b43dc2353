"""Error-message helpers for input from others: what a message quotes of it is bounded."""

from __future__ import annotations

import reprlib
from typing import Any

QUOTE_LIMIT = 80  # characters of a user's value an error message may quote

# reprlib bounds the work as well as the text: a nested value (an expanded YAML alias, a pasted
# array) is never walked past a few levels and items.
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxstring = _REPR.maxother = QUOTE_LIMIT


def brief(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """A repr of `value` of at most `limit` characters, cut with an ellipsis and its length."""
    text = _REPR.repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 12]}… ({len(text)} chars)"


def decode_utf8(raw: bytes, source: str, error: type[Exception] = ValueError) -> str:
    """`raw` as UTF-8 text; otherwise one `error` naming `source`, the line and the byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise error(
            f"{source}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {line} (byte offset "
            f"{exc.start}) cannot be decoded; save the file as UTF-8"
        ) from exc
