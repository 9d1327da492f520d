"""Shared fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

# The suite runs on three pytest-xdist workers (pyproject's addopts): on 2 cores, the third
# fills the time the real-process deployment tests spend waiting on Flower's polling. A process
# computing on as many OpenMP threads as there are cores, beside another one doing the same,
# runs several times slower than on one thread (measured 4.5x on 2 cores: the threads spin
# waiting for a core the other process holds). So every worker, and every process a test starts
# (they inherit the environment), computes on one thread, and OpenMP threads that wait sleep
# instead of spinning (OMP_WAIT_POLICY=PASSIVE: two 2-thread processes then ran 7-10 s where
# they had run 70 s), which lets the end-to-end demo, the critical path, use two.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = "1"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Tiny-model tests run far faster on one thread on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


LONGEST_FIRST = (
    "test_e2e_demo.py",
    "test_study.py",
    "test_task_deployment.py",
    "test_deployment.py",
    "test_e2e_pe.py",
    "test_llamacpp.py",
)
"""The longest modules (minutes each, measured in CI), started first in this order."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the longest modules first, then the other slow ones, then the rest (stable order).

    With ``-n 3`` (``pytest-xdist``, one module per worker at a time, in this order) the long
    modules start at once and the many short tests fill the workers around them, instead of a
    long module starting last and running alone.
    """

    def rank(item: pytest.Item) -> tuple[int, int]:
        name = item.path.name
        if name in LONGEST_FIRST:
            return 0, LONGEST_FIRST.index(name)
        return (1 if item.get_closest_marker("slow") else 2), 0

    items.sort(key=rank)
