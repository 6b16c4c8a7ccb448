"""CSV errors name the line a record starts on; long fields within the line limit load."""

from __future__ import annotations

import pytest

from core.data import MAX_LINE_BYTES, load_records
from core.errors import DataError


def test_error_names_the_first_line_of_a_multiline_record(tmp_path):
    c = tmp_path / "d.csv"
    c.write_text(
        'text,label\n"fine",pos\n"a review\nthat spans\nthree lines",neg,extra\n"ok",pos\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as ei:
        load_records(c)
    assert ei.value.line == 3, ei.value  # the record starts on line 3 (ends on line 5)
    assert "columns" in str(ei.value)


def test_malformed_record_names_its_first_line(tmp_path):
    c = tmp_path / "d.csv"
    c.write_text(
        'text,label\n"ok",pos\n"starts here\nends" badly,neg\n"ok",pos\n', encoding="utf-8"
    )
    with pytest.raises(DataError) as ei:
        load_records(c)
    assert ei.value.line == 3 and "malformed CSV" in str(ei.value)


def test_a_long_field_under_the_line_limit_loads(tmp_path):
    long_text = "word " * 60_000  # 300 kB: over csv's default 128 KiB field limit
    assert len(long_text) < MAX_LINE_BYTES
    c = tmp_path / "d.csv"
    c.write_text(f'text,label\n"{long_text}",pos\n"short",neg\n', encoding="utf-8")
    data = load_records(c)
    assert [r["label"] for r in data.records] == ["pos", "neg"]
    assert len(data.records[0]["text"]) == len(long_text)
