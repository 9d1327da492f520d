"""The study's methods: one module each, one interface (:data:`MethodRunner`), one table.

:data:`RUNNERS` maps every method name of :data:`fedsynth.simulations.study_config.METHODS`
(what the method guarantees, which sweep columns apply) to the function that runs a cell of it.
A new method is a module with ``run(ctx, cell) -> CellOutput``, a row in ``METHODS`` and one
here.
"""

from __future__ import annotations

from fedsynth.simulations.methods import (
    dp_fedavg,
    dp_sgd,
    icl_verbatim,
    noisy_icl,
    pe,
    pe_steered,
    prior,
    rpsg,
    vector,
    vector_pooled,
)
from fedsynth.simulations.methods.base import (
    CellOutput,
    Generator,
    MethodRunner,
    SeedState,
    StudyContext,
)
from fedsynth.simulations.study_config import METHODS

RUNNERS: dict[str, MethodRunner] = {
    "prior": prior.run,
    "vector": vector.run,
    "vector-pooled": vector_pooled.run,
    "vector-nonprivate": vector_pooled.run,  # the same code at ε = ∞
    "pe": pe.run,
    "pe-steered": pe_steered.run,
    "dp-sgd": dp_sgd.run,
    "dp-fedavg": dp_fedavg.run,
    "rpsg": rpsg.run,
    "noisy-icl": noisy_icl.run,
    "icl-verbatim": icl_verbatim.run,
}

if set(RUNNERS) != set(METHODS):  # a method row without a runner, or the other way round
    raise ImportError(f"method table and runners differ: {sorted(set(RUNNERS) ^ set(METHODS))}")


def runner_for(method: str) -> MethodRunner:
    """The function that runs a cell of ``method`` (a name of the method table)."""
    return RUNNERS[method]


__all__ = [
    "RUNNERS",
    "CellOutput",
    "Generator",
    "MethodRunner",
    "SeedState",
    "StudyContext",
    "runner_for",
]
