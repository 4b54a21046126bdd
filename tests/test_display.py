"""What the command line and the dashboard print about workers and values, from the records alone."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest

from sonamu_tasks.display import heartbeat_text, json_excerpt, preview
from sonamu_tasks.display_text import MAX_CELL_WIDTH, escaped, fit, format_table, readable_json, width
from sonamu_tasks.ids import new_run_id
from sonamu_tasks.records import STALE_AFTER, CutValue, WorkerRecord

# An escape sequence a cut split: a lone backslash (not itself escaped) at the end, or `\u` and fewer than 4 hex.
PARTIAL_ESCAPE = re.compile(r"(?<!\\)(\\\\)*\\(u[0-9a-fA-F]{0,3})?$")


def worker(silent_for: float, now: datetime) -> WorkerRecord:
    seen = now - timedelta(seconds=silent_for)
    return WorkerRecord("w1", "host", 7, [("mail", "1")], 4, seen, seen, queues=["default"])


def test_a_worker_silent_past_stale_after_is_marked_stale_as_the_lists_take_it_as_gone() -> None:
    now = datetime.now(UTC)
    assert heartbeat_text(worker(3.25, now), now) == "3.2s"
    assert heartbeat_text(worker(STALE_AFTER, now), now) == "60.0s"  # the lists still count it live
    assert heartbeat_text(worker(75, now), now) == "75.0s (stale)"


def test_values_show_their_characters_not_unicode_escapes() -> None:
    assert preview({"이름": "김철수"}, 80) == '{"이름": "김철수"}'
    assert preview(["café", "😀", "日本"], 80) == '["café", "😀", "日本"]'
    assert json_excerpt({"이름": "김철수"}, 1000, indent=2) == ('{\n  "이름": "김철수"\n}', False)


def test_what_would_act_on_a_terminal_or_reorder_a_line_stays_escaped() -> None:
    """C0 and C1 controls (ESC clears a screen; U+009B starts an escape sequence in many terminals), DEL, line
    separators, bidirectional overrides and lone surrogates stay escaped; the text is still the value's JSON."""
    value = {"k\x1b": "a\x1b[2J\u009b\x7f\u2028\u202e\u2066\ud800\n\t"}
    text, cut = json_excerpt(value, 1000)
    assert not cut and text == '{"k\\u001b": "a\\u001b[2J\\u009b\\u007f\\u2028\\u202e\\u2066\\ud800\\n\\t"}'
    assert json.loads(text) == value
    assert text.isprintable()


def test_a_cut_is_by_characters_and_never_ends_inside_an_escape() -> None:
    assert preview("가" * 100, 10) == '"' + "가" * 8 + "…"
    value = {"a": "x\n\u202e\\\\y" * 3, "이름": "김\x1b철수"}
    whole, _ = json_excerpt(value, 10_000)
    for limit in range(len(whole)):
        text, cut = json_excerpt(value, limit)
        assert cut and len(text) <= limit and whole.startswith(text), (limit, text)
        assert not PARTIAL_ESCAPE.search(text), (limit, text)
        assert len(text) >= limit - 5  # at most one escape sequence dropped


def test_an_excerpt_cut_by_the_database_shows_its_characters_too() -> None:
    """SQLite stores JSON with ASCII escapes; a capped read's excerpt of it reads as the characters, and a cut
    inside an escape (by the database, or by the limit) leaves no piece of it."""
    stored = json.dumps({"이름": "김철수 😀", "q": '"\\u00e9"', "c": "\x1b"})
    assert readable_json(stored) == '{"이름": "김철수 😀", "q": "\\"\\\\u00e9\\"", "c": "\\u001b"}'
    assert json_excerpt(CutValue(stored, len(stored)), 1000) == (readable_json(stored), True)
    assert json_excerpt(CutValue(stored[:22], None), 1000) == ('{"이름": "', True)  # `\\uae40` cut after `\\uae`
    assert json_excerpt(CutValue(stored, None), 8) == ('{"이름": "', True)


@pytest.mark.parametrize(
    ("text", "keep", "shown"),
    [
        ("boom\x1b[2J", "", "boom\\u001b[2J"),
        ("line one\nline two\u202e", "\n", "line one\nline two\\u202e"),
        ("a\tb\r\n", "", "a\\tb\\r\\n"),
        ("잘못된 값 é", "", "잘못된 값 é"),
    ],
)
def test_plain_text_keeps_its_characters_and_escapes_controls(text: str, keep: str, shown: str) -> None:
    assert escaped(text, keep=keep) == shown


def test_width_counts_the_columns_a_terminal_gives_each_character() -> None:
    assert width("abc") == 3
    assert width("김철수") == 6 and width("日本") == 4  # wide: 2 each
    assert width("\uff46\uff55\uff4c\uff4c") == 8  # fullwidth letters: 2 each
    assert width("😀") == 2
    assert width("e\u0301") == 1 and width("a\u200db") == 2  # a combining mark, a zero-width joiner: 0
    assert fit("김철수입니다", 7) == "김철수…" and width(fit("김철수입니다", 7)) == 7
    assert fit("short", 7) == "short" and fit("a" * 8, 7) == "aaaaaa…"


def test_a_table_aligns_wide_characters_by_the_columns_they_take() -> None:
    table = format_table(["WORKFLOW", "STATUS"], [["주문_처리@1", "failed"], ["filler@1", "pending"]])
    lines = table.splitlines()
    starts = {width(line[: line.rindex("  ") + 2]) for line in lines}
    assert len(starts) == 1, table  # STATUS starts at the same column on every row
    assert lines[1] == "주문_처리@1  failed"


def test_a_long_cell_is_cut_but_a_run_id_and_a_whole_column_are_kept() -> None:
    run_id = new_run_id()
    rows = [[run_id, "w" * 190, "x" * 50 + " " + run_id, "host-" * 20]]
    _, line = format_table(["ID", "WORKFLOW", "LAST RUN", "HOST"], rows, whole=("HOST",)).splitlines()
    cells = line.split("  ")
    assert cells[0] == run_id
    assert cells[1] == "w" * (MAX_CELL_WIDTH - 1) + "…"
    assert cells[2] == "x" * 50 + " " + run_id  # holds a run id: never cut, the id must stay copyable
    assert cells[3] == "host-" * 20


def test_a_cell_cannot_break_its_row() -> None:
    table = format_table(["STEP", "OUTPUT"], [["a\nb", "x\x1b[2J"], ["c", None]])
    assert table.splitlines() == ["STEP  OUTPUT", "a\\nb  x\\u001b[2J", "c"]
