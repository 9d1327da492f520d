"""``pe-steered``: federated PE whose populations are steered by a dataset-vector release.

Part of the cell's ε (``[pe] init_fraction``, half of δ) buys a federated dataset-vector
release in the same federation; the first population is sampled steered by it and so is every
variation, and the PE rounds spend the rest (basic composition to the cell's ε).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedsynth.simulations.methods.base import CellOutput, StudyContext
from fedsynth.simulations.methods.pe import run_pe

if TYPE_CHECKING:
    from fedsynth.simulations.study_config import Cell


def run(ctx: StudyContext, cell: Cell) -> CellOutput:
    """The steered-init PE cell (see the module docstring)."""
    return run_pe(ctx, cell, init="steered")
