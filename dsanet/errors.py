"""Error-message helpers for input from others: what a message quotes of it is bounded."""

from __future__ import annotations

import re
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


# A URI's user information, `scheme://user:secret@`: everything up to the last `@` before a `/`
# or whitespace, so an unescaped `@` or quote in a password is masked whole.
_USERINFO = re.compile(r"(\w[\w+.-]*://)[^/\s]*@")
# A secret in a query string, `?password=...` or `&token=...` (a name holding one of these).
_QUERY_SECRET = re.compile(
    r"([?&;][\w.-]*(?:pass|pwd|secret|token|key|auth|credential|signature)[\w.-]*=)[^&;#\s'\"]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with the credentials of the URIs in it masked: `scheme://***@host`, and the
    values of secret-looking query parameters (`?password=***`). For URIs in messages, logs and
    copies of a user's files."""
    return _QUERY_SECRET.sub(r"\1***", _USERINFO.sub(r"\1***@", text))
