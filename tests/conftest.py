"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Tiny-model tests run far faster on one thread on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the slow end-to-end modules first (stable order otherwise).

    With ``-n 2`` (``pytest-xdist``, one module per worker at a time) the long modules then
    start at once and the many short tests fill the other worker around them, instead of one
    long module starting last and running alone.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
