"""What a coordinator could time: a holder's setup reply against the size of its data file.

Measured side by side in one process on JSON Lines files of two sizes (default 200 and 80,000
records; ``--quick``: 200 and 8,000): the setup's data step (validate and count the file for
the task's labels, check it against the holder's ``max_records``) the first time a version of
the file is seen (a full read) and then from the holder's data index (``client/data_index.py``).
The baseline of each indexed figure is the same step on the small file: a ratio near 1 means
the reply time no longer tells the file's size. The masked input's time is the holder's own
``masked_input_reply_s`` (a fixed wait, tested in ``tests/server/test_secure_round.py``), so
there is nothing to time there but the sleep.

Run: python benchmarks/bench_timing.py [--quick]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: benchmarks.common
from benchmarks.common import Figure, compared, info, run_script
from fedsynth.client.contributor import Contributor
from fedsynth.client.data_index import SETTLED_NS
from fedsynth.client.settings import ClientSettings

FULL_SIZES = (200, 80_000)
QUICK_SIZES = (200, 8_000)
REPEATS = 7


def _write(path: Path, n: int) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            text = f"review {i}: an ordinary film, neither the best nor the worst of its year"
            handle.write(json.dumps({"text": text, "label": "ab"[i % 2]}) + "\n")
    return path


def _setup_step(data: Path, budget: Path) -> float:
    """Seconds of one setup's data step, as a fresh ClientApp process would run it."""
    holder = Contributor(
        ClientSettings(data_path=data, budget_path=budget),
        node_id=1,
        model_loader=lambda: None,  # type: ignore[arg-type,return-value]
    )
    start = time.perf_counter()
    holder.record_count(("a", "b"))
    holder.check_file_size()
    return time.perf_counter() - start


def measure(sizes: tuple[int, ...], root: Path) -> dict[int, tuple[float, float]]:
    """Per file size: (first setup's seconds, median indexed setup's seconds)."""
    files = {n: _write(root / f"data-{n}.jsonl", n) for n in sizes}
    # A version is indexed once it has stood unchanged for SETTLED_NS: wait it out once.
    time.sleep(SETTLED_NS / 1e9 + 0.1)
    out = {}
    for n, data in files.items():
        budget = root / f"node-{n}" / "budget.sqlite"
        first = _setup_step(data, budget)
        indexed = statistics.median(_setup_step(data, budget) for _ in range(REPEATS))
        out[n] = (first, indexed)
    return out


def figures(quick: bool) -> list[Figure]:
    """The setup's data step on a small and a large file, read in full and from the index."""
    sizes = QUICK_SIZES if quick else FULL_SIZES
    with tempfile.TemporaryDirectory() as tmp:
        times = measure(sizes, Path(tmp))
    small, large = sizes
    out = [
        info(
            "timing",
            f"setup data step, first read of a version ({large:,} vs {small:,} records)",
            times[large][0],
            "s",
            baseline=times[small][0],
            note="the one reply per version of the file whose time grows with it",
        ),
        compared(
            "timing",
            f"setup data step from the data index ({large:,} vs {small:,} records)",
            times[large][1],
            "s",
            baseline=times[small][1],
            at_most=2.0,
            judge=not quick,
            note=f"median of {REPEATS}; a ratio near 1: the reply time does not tell the size",
        ),
        info(
            "timing",
            f"setup data step, indexed vs first read ({large:,} records)",
            times[large][1],
            "s",
            baseline=times[large][0],
        ),
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the figures (``--quick``: small sizes)."""
    return run_script(__doc__ or "", figures, argv)


if __name__ == "__main__":
    sys.exit(main())
