"""Text for people, in a terminal or a page: a value's JSON with its characters as they are (`김철수`, not
`\\uae40\\ucca0\\uc218`), but every character that would act on a terminal or reorder a line escaped, so that
no stored value can clear a screen, hide what follows it or break a table; and the command line's tables,
aligned by the columns characters take in a terminal (two for `김`), long cells cut."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection, Sequence
from typing import Any

from .ids import RUN_ID

MAX_CELL_WIDTH = 60
"""Terminal columns a table cell takes at most (the previews `show` prints are as wide): a longer name or list
is cut with an ellipsis, so that one 190-character workflow name does not make every row 290 columns wide."""

# What JSON leaves as it is inside a string once it may hold any character (ensure_ascii=False): DEL and the C1
# controls (U+009B starts an escape sequence in many terminals), the line and paragraph separators, the
# bidirectional embeddings, overrides and isolates (they reorder what follows on the line), and lone
# surrogates, which a UTF-8 terminal cannot even print. JSON escapes the C0 controls itself.
_UNSAFE_IN_JSON = "\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE_IN_JSON_RE = re.compile(f"[{_UNSAFE_IN_JSON}]")
_UNSAFE_RE = re.compile(f"[\x00-\x1f{_UNSAFE_IN_JSON}]")
_JSON_ESCAPE = re.compile(r"\\(?:u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|.)")
_SHORT_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _SHORT_ESCAPES.get(char) or f"\\u{ord(char):04x}"


def escaped_json(text: str) -> str:
    """JSON text encoded with ensure_ascii=False, with the characters it left that act on a terminal or a line
    as \\uXXXX escapes (still valid JSON: they can only be inside strings)."""
    return _UNSAFE_IN_JSON_RE.sub(_escape, text)


def escaped(text: str, *, keep: str = "") -> str:
    """Plain text (an error message, a name) with its control characters (but those in `keep`, such as a
    traceback's newlines), separators and bidirectional overrides escaped: `\\n`, `\\u001b`."""
    if keep:
        return _UNSAFE_RE.sub(lambda match: match.group() if match.group() in keep else _escape(match), text)
    return _UNSAFE_RE.sub(_escape, text)


def readable_json(text: str) -> str:
    """JSON text written with ensure_ascii (SQLite's stored values, an excerpt a capped read cut from them) with
    its \\uXXXX escapes turned back into the characters; the escapes of what `escaped_json` escapes, of ASCII
    (a quote, a control character) and of a surrogate without its pair stay."""

    def readable(match: re.Match[str]) -> str:
        high, low, single = match.groups()
        if high is not None:
            char = chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + int(low, 16) - 0xDC00)
        elif single is not None:
            char = chr(int(single, 16))
        else:
            return match.group()  # `\n`, `\"`, `\\`: consumed whole, so `\\u00e9` is not misread
        return match.group() if char.isascii() or _UNSAFE_RE.match(char) else char

    return _JSON_ESCAPE.sub(readable, text)


def whole_escapes(text: str) -> str:
    """`text` (a cut of JSON text) without an escape sequence that the cut split at its end: `"ab\\` or
    `"ab\\u00` lose the piece of escape, `"ab\\\\` (an escaped backslash) and `"ab\\n` are whole."""
    head, backslash, tail = text.rpartition("\\")
    if not backslash:
        return text
    run = len(head) - len(head.rstrip("\\")) + 1  # backslashes in a row, ending with this one
    if run % 2 == 0:
        return text  # the last one is escaped: `\\`
    if not tail or (tail[0] == "u" and len(tail) < 5):
        return head
    return text


def width(text: str) -> int:
    """The columns `text` takes in a terminal: two for a wide (East Asian) character, none for a combining
    mark or a zero-width one, one for any other."""
    if text.isascii():
        return len(text)  # the common case, and exact: the control characters are escaped before
    return sum(_char_width(char) for char in text)


def _char_width(char: str) -> int:
    if unicodedata.combining(char) or (unicodedata.category(char) in ("Mn", "Me", "Cf") and char != "\xad"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def fit(text: str, most: int, *, keep_end: bool = False) -> str:
    """`text` cut to at most `most` columns, its end replaced by an ellipsis when it was longer (`keep_end`:
    its start, for a text whose end tells rows apart, such as a fan-out child's step `charge[17]`)."""
    if width(text) <= most:
        return text
    kept, used = [], 0
    for char in reversed(text) if keep_end else text:
        used += _char_width(char)
        if used > most - 1:
            break
        kept.append(char)
    return "…" + "".join(reversed(kept)) if keep_end else "".join(kept) + "…"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, whole: Collection[str] = ()) -> str:
    """Columns padded to their widest cell, in terminal columns: readable in a terminal, stable for eyes and
    diffs. A cell is cut at MAX_CELL_WIDTH columns, unless it holds a run id (which must stay whole to be
    copied) or its column is one of `whole`; its control characters are escaped (a newline would break the
    row)."""
    keep = [header in whole for header in headers]

    def cell(value: Any, column: int) -> str:
        text = escaped("" if value is None else str(value))
        return text if keep[column] or RUN_ID.search(text) else fit(text, MAX_CELL_WIDTH)

    cells = [[escaped(str(h)) for h in headers], *[[cell(c, i) for i, c in enumerate(row)] for row in rows]]
    sizes = [[width(text) for text in row] for row in cells]
    widths = [max(row[i] for row in sizes) for i in range(len(headers))]
    lines = [
        "  ".join(text + " " * (widths[i] - size[i]) for i, text in enumerate(row)).rstrip()
        for row, size in zip(cells, sizes, strict=True)
    ]
    return "\n".join(lines)
