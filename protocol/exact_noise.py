"""Distributed noise that is exactly the target whatever the dropouts (add, then remove excess).

With plain shares each of K holders adds Skellam noise of variance v/t, so that any t survivors
already carry the target v: when s > t holders survive, the sum carries s·v/t, more noise than
the accountant needs. Here (after Dordis's "XNoise", Jiang et al., EuroSys 2024) a holder adds
the same v/t, but as a *base* part of variance v/K drawn from the OS and K − t *excess*
components, component k (t ≤ k < K) of variance v/k − v/(k+1), each drawn from a seeded
generator. Once the secure sum has fixed the survivor set, of size s, every survivor reveals the
seeds of its components k < s, and the coordinator regenerates and subtracts them. What stays is
v/K + Σ_{k=s}^{K-1} (v/k − v/(k+1)) = v/s per survivor, v in all: the target, for every s
from t to K.

The seeds form a hash chain: seed_{K-1} is random and seed_k = H(k, seed_{k+1}). Revealing one
seed, seed_{s-1}, gives the coordinator every removable component and, because the hash is
one-way, none of the components k ≥ s that must stay. A holder reveals only for the survivor set
it verified in the consistency round (signed by every survivor), so a coordinator cannot make it
remove more than that set allows. A survivor that leaves before revealing keeps its excess in the
sum: more noise than the target, never less. Skellam variables add up to Skellam variables, so
the kept noise is a Skellam of variance exactly v and the Skellam accountant applies unchanged.

With c holders that may collude with the coordinator (and add no noise), the same ladder runs
over the honest holders only: base v/(K − c), components t − c ≤ k < K − c, and s survivors
reveal down to v/(s − c) each, so any s − c of them carry v: a share of v/(t − c) in all.

**The whole-round component.** Everyone surviving is the common case, and there the ladder
makes each survivor reveal all K − t components (K·(K − t)·d draws to redraw). So where it fits,
the ladder's last rung is replaced by one component W of variance v/t − v/K (writing t, K for
t − c, K − c), removed exactly when all K survive, and the base grows to
v/K + v/(K − 1) − v/t: all K survive → W is removed, base + rungs t..K − 2 = v/K stays; s < K
survive → rungs t..s − 1 are removed as before and base + W + rungs s..K − 2 = v/s stays. Either
way exactly the target, and all-surviving costs one component per survivor. W's seed is
H(K, seed_{K-1}), beside the chain (seed_{K-1} itself is no component now and never revealed),
so revealing it says nothing of the rungs, and a rung's seed nothing of W. The base is
non-negative exactly when 1/K + 1/(K − 1) ≥ 1/t, which every threshold a holder accepts
satisfies (2t > K + c, so t − c > (K − c)/2); a schedule below that keeps the plain ladder.

Removing the excess costs s·(s − t)·d Skellam draws if the coordinator redraws every survivor's
components from the revealed seeds when some holders dropped (about 7 s at K = 100, d = 65,537
on two cores with a few dropped), K·d when all survive (W). So the
coordinator may instead ask each survivor for the *sum* of its removed components, which the
survivor draws itself: the coordinator then only subtracts s vectors. The sum tells the
coordinator less than the seed it replaces (seed_{s-1} gives each component k < s, the sum only
their total), and a survivor that sends a wrong sum shifts only its own term of the sum, which it
could do through its input anyway: the honest survivors' kept noise, which the accountant counts,
is untouched. The upload costs a vector of small integers (about a fifth of the masked one after
compression), so the coordinator asks for it only where redrawing would be slow
(:func:`removal_mode`).

**Binary blocks beyond K = 26.** With holders dropped the ladder has each survivor reveal up to
K − t − 1 rungs, all redrawn by the coordinator (99 × 48 draws of d at K = 100 with one
dropped). Exactness needs that many independent components, one per survivor count; allowing
the kept part to exceed the target by at most 1/TOLERANCE of it needs only a logarithm. Beside
W, the excess for up to T = K − 1 survivors (K where W cannot exist), v/t − v/T, is cut into
U = ⌈TOLERANCE·(T − t)/t⌉ units and drawn as blocks of 1, 2, 4, … units and the rest; s
survivors remove the most whole units that keep v/s (a subset of at most bit-length(U) blocks,
six at K = 100), so what stays is within one unit, at most 1/TOLERANCE, above v/s, and exactly
v/s at s = t, T and K. Each block has its own seed H(j, seed); a survivor reveals exactly its
removed blocks' seeds, concatenated. Subsets for different s are not nested, so a holder must
reveal once only (it answers unmask once). :attr:`NoiseSchedule.uses_blocks` takes blocks
where they remove at most half as many components as the ladder would.

This module is the arithmetic only (schedule, seeds, components); no messages.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedsynth.protocol.errors import ConfigError, ProtocolError
from fedsynth.protocol.mechanisms import skellam_noise

SEED_BYTES = 32
NOISE_SEED_FIELD = "noise_seed"  # the unmask reply's field holding a survivor's seed_{s-1}
NOISE_EXCESS_FIELD = "noise_excess"  # ... or the sum of its removed components, when asked
REMOVAL_FIELD = "noise_removal"  # the unmask request's field: which of the two to send
REMOVAL_SEED = "seed"
REMOVAL_UPLOAD = "upload"
REMOVAL_AUTO = "auto"
REMOVAL_MODES = (REMOVAL_SEED, REMOVAL_UPLOAD)
AUTO_UPLOAD_SAMPLES = 2**26
"""``auto`` asks for uploads when redrawing would take more Skellam draws than this (~1.5 s on
two cores)."""
TOLERANCE = 50
"""Binary blocks keep at most 1 + 1/TOLERANCE times the target variance (σ within 1 %)."""
_CHAIN_DOMAIN = b"fedsynth/exact-noise/chain/v1"
_COMPONENT_DOMAIN = b"fedsynth/exact-noise/component/v1"
_BLOCK_DOMAIN = b"fedsynth/exact-noise/block/v1"


@dataclass(frozen=True)
class NoiseSchedule:
    """How one holder's share v/(t − c) splits into a base part and K − t removable components.

    ``colluders`` (c): holders that may side with the coordinator and add nothing; the
    schedule is then sized for the s − c honest ones among any s survivors.
    """

    total_variance: float
    threshold: int
    clients: int
    colluders: int = 0

    def __post_init__(self) -> None:
        v, t, k = self.total_variance, self.threshold, self.clients
        if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
            raise ConfigError(f"total_variance={v!r}: must be finite and >= 0")
        for name, value in (("threshold", t), ("clients", k)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name}={value!r}: must be an integer")
        if not 1 <= t <= k:
            raise ConfigError(f"threshold t={t} and clients K={k}: need 1 <= t <= K")
        c = self.colluders
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < t:
            raise ConfigError(f"colluders={c!r}: must be an int with 0 <= c < t={t}")

    @property
    def _honest(self) -> int:
        """K − c: the holders that add noise however many collude."""
        return self.clients - self.colluders

    @property
    def _floor(self) -> int:
        """The fewest honest holders among any t survivors: t − c."""
        return self.threshold - self.colluders

    @property
    def whole(self) -> int | None:
        """Index K − c of the whole-round component W, or None where it cannot exist.

        W exists when there is something to remove (K > t) and the base it leaves,
        v/K + v/(K − 1) − v/t (c subtracted from each), is not negative; on the ladder and
        with blocks alike.
        """
        honest, floor = self._honest, self._floor
        # 1/K + 1/(K − 1) >= 1/t, in integers (K > t >= 1, so K − 1 >= 1)
        if honest <= floor or floor * (2 * honest - 1) < honest * (honest - 1):
            return None
        return honest

    @property
    def _block_top(self) -> int:
        """The most honest survivors whose excess the blocks remove: K − c − 1 beside W."""
        honest = self._honest
        return honest - 1 if self.whole is not None else honest

    @property
    def units(self) -> int:
        """The blocks' excess in units of at most 1/TOLERANCE of the smallest kept share.

        The blocks remove up to v/(t − c) − v/T for T = K − c − 1 (beside W) or K − c:
        ⌈TOLERANCE·(T − (t − c))/(t − c)⌉ units; 0 when nothing is removable.
        """
        top, floor = self._block_top, self._floor
        if top <= floor:
            return 0
        return -(-TOLERANCE * (top - floor) // floor)

    @property
    def block_units(self) -> tuple[int, ...]:
        """Sizes, in units, of the binary blocks: 1, 2, 4, …, 2^(m−2), then the rest.

        Their sums over subsets reach every whole number of units from 0 to :attr:`units`,
        each with at most m = ``units.bit_length()`` blocks.
        """
        total = self.units
        if total == 0:
            return ()
        m = total.bit_length()
        powers = tuple(1 << j for j in range(m - 1))
        return (*powers, total - ((1 << (m - 1)) - 1))

    @property
    def uses_blocks(self) -> bool:
        """Binary blocks instead of the ladder: where they remove at most half as many.

        The ladder removes up to K − t − 1 rungs per survivor (c subtracted) and keeps exactly
        the target; the blocks remove at most m = ``units.bit_length()`` (6 at TOLERANCE 50)
        and keep up to 1/TOLERANCE more than the target between the two ends. So the ladder
        runs up to K = 26 (t a majority), the blocks beyond; W stays where it exists.
        """
        honest, floor = self._honest, self._floor
        units = self.units
        return units > 0 and 2 * units.bit_length() <= honest - floor - 1

    @property
    def rungs(self) -> range:
        """Indices k of the ladder's components, t − c ≤ k < K − c (K − c − 1 with W)."""
        top = self._honest
        if self.uses_blocks:
            return range(0)
        return range(self._floor, top - 1 if self.whole else top)

    @property
    def base_variance(self) -> float:
        """Variance of the part drawn from the OS, never removed.

        v/(K − c) on the plain ladder; v/(K − c) + v/(K − c − 1) − v/(t − c) with W.
        """
        v, honest = self.total_variance, self._honest
        if self.whole is None:  # no W: removing every component leaves v/(K − c)
            return v / honest
        return max(0.0, v / honest + v / (honest - 1) - v / self._floor)

    @property
    def share_variance(self) -> float:
        """All a holder adds, base plus every component: v/(t − c), as a plain share."""
        return self.total_variance / self._floor

    @property
    def components(self) -> tuple[int, ...]:
        """Indices of the removable components.

        The rungs, then W's (K − c) if there is one; with blocks, 0 .. m − 1.
        """
        whole = self.whole
        with_whole = () if whole is None else (whole,)
        if self.uses_blocks:
            return (*range(len(self.block_units)), *with_whole)
        return (*self.rungs, *with_whole)

    @property
    def unit_variance(self) -> float:
        """One unit of the blocks: (v/(t − c) − v/(K − c)) / :attr:`units` (0 without any)."""
        units = self.units
        if units == 0:
            return 0.0
        v = self.total_variance
        return (v / self._floor - v / self._block_top) / units

    def component_variance(self, k: int) -> float:
        """Variance of component k.

        v/k − v/(k+1) for a rung, v/(t − c) − v/(K − c) for W, and for a block its units times
        :attr:`unit_variance`.
        """
        v = self.total_variance
        if k == self.whole:
            return v / self._floor - v / k
        if self.uses_blocks:
            if k not in range(len(self.block_units)):
                shown = ", ".join(str(j) for j in self.components)
                raise ConfigError(f"component {k}: must be one of {shown}")
            return self.block_units[k] * self.unit_variance
        if k not in self.rungs:
            shown = ", ".join(str(j) for j in self.components) or "none"
            raise ConfigError(f"component {k}: must be one of {shown}")
        return v / k - v / (k + 1)

    def check_survivors(self, survivors: int) -> int:
        """``survivors`` as an int, or an error if the secure sum cannot have that many."""
        if isinstance(survivors, bool) or not isinstance(survivors, int | np.integer):
            raise ProtocolError(f"survivors={survivors!r}: must be an integer")
        if not self.threshold <= survivors <= self.clients:
            raise ProtocolError(
                f"survivors={survivors}: a secure sum needs between t={self.threshold} and "
                f"K={self.clients}"
            )
        return int(survivors)

    def removed(self, survivors: int) -> Sequence[int]:
        """Components every survivor reveals when s inputs are in the sum.

        W alone when all K do (and W exists), else the rungs t − c .. s − c − 1. With blocks,
        those whose units add up to :meth:`units_removed` (the last, largest block first where
        the smaller ones cannot reach it).
        """
        honest = self.check_survivors(survivors) - self.colluders
        if honest == self.whole:
            return range(honest, honest + 1)
        if self.uses_blocks:
            return self._blocks_for(self.units_removed(survivors))
        return range(self._floor, honest)

    def units_removed(self, survivors: int) -> int:
        """Units of excess a survivor's blocks remove when s inputs are in the sum.

        The most whole units r with v/(t − c) − r·u ≥ v/(s − c), u the unit variance, in
        integers: ⌊units · (s − t) · T / ((T − (t − c)) · (s − c))⌋, T the blocks' top
        (:attr:`units`). Exactly 0 at s = t and all units at s − c = T, so those keep exactly
        the target (and all K, where W alone is removed); in between the kept part exceeds
        v/(s − c) by less than one unit, at most 1/TOLERANCE of it. 0 where W is removed.
        """
        s = self.check_survivors(survivors)
        top, floor = self._block_top, self._floor
        if top <= floor or s - self.colluders > top:  # nothing, or all K: W instead
            return 0
        return (self.units * (s - self.threshold) * top) // ((top - floor) * (s - self.colluders))

    def _blocks_for(self, units: int) -> tuple[int, ...]:
        """Block indices whose units add up to ``units`` (0 .. :attr:`units`), ascending."""
        sizes = self.block_units
        chosen: list[int] = []
        if sizes and units > (1 << (len(sizes) - 1)) - 1:
            chosen.append(len(sizes) - 1)
            units -= sizes[-1]
        bits = [j for j in range(len(sizes) - 1) if units >> j & 1]
        if units < 0 or units >> max(len(sizes) - 1, 0):
            raise ProtocolError(f"{units} units cannot be removed with blocks {sizes}")
        return tuple(sorted([*bits, *chosen]))

    def revealed_length(self, survivors: int) -> int:
        """Bytes a survivor reveals for ``survivors`` inputs (0 when nothing is removed).

        One seed on the ladder (the chain gives the rest), one per removed block.
        """
        removed = self.removed(survivors)
        if not removed:
            return 0
        return SEED_BYTES * (len(removed) if self.uses_blocks else 1)

    def kept_variance(self, survivors: int) -> float:
        """What stays of one survivor's noise after removal: v/(s − c)."""
        removed = self.removed(survivors)
        return self.base_variance + sum(
            self.component_variance(k) for k in self.components if k not in removed
        )


def _check_seed(seed: bytes, what: str) -> bytes:
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise ProtocolError(f"{what}: must be {SEED_BYTES} bytes")
    return seed


def _down(seed: bytes, k: int) -> bytes:
    """seed_k from seed_{k+1} (SHA-256, one-way)."""
    return hashlib.sha256(_CHAIN_DOMAIN + k.to_bytes(4, "big") + seed).digest()


def _walk_down(seed: bytes, indices: Sequence[int]) -> dict[int, bytes]:
    """``seed`` is seed_{indices[-1]}; hash down the chain to seed_{indices[0]}."""
    seeds = {indices[-1]: seed}
    for k in reversed(indices[:-1]):
        seed = _down(seed, k)
        seeds[k] = seed
    return seeds


def _sum_components(
    seeds: dict[int, bytes], schedule: NoiseSchedule, total: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Add the component of every (index, seed) to ``total`` in place and return it."""
    for k, seed in seeds.items():
        total += component_noise(seed, k, schedule, int(total.shape[0]))
    return total


def chain_seeds(top: bytes, schedule: NoiseSchedule) -> dict[int, bytes]:
    """Every component's seed: seed_{K-1} = ``top``, seed_k = H(k, seed_{k+1}) down to t.

    With the whole-round component W, its seed is H(K, ``top``) and ``top`` seeds no component.
    """
    seed = _check_seed(top, "chain seed")
    if schedule.uses_blocks:  # independent seeds: any subset can be revealed alone
        return {j: _block_seed(seed, j) for j in schedule.components}
    whole = schedule.whole
    if whole is None:
        return _walk_down(seed, schedule.rungs) if schedule.rungs else {}
    chain = _walk_down(seed, range(schedule.rungs.start, whole))
    del chain[whole - 1]  # the root: no component of its own
    chain[whole] = _down(seed, whole)
    return chain


def _block_seed(top: bytes, j: int) -> bytes:
    """Block j's seed: H(j, top), one-way, so no block's seed tells another's."""
    return hashlib.sha256(_BLOCK_DOMAIN + j.to_bytes(4, "big") + top).digest()


def revealed_seed(top: bytes, schedule: NoiseSchedule, survivors: int) -> bytes | None:
    """What a survivor reveals for ``survivors`` inputs; None when nothing is removed.

    On the ladder one seed: W's when all K survive and W exists, else seed_{s-1}. With blocks,
    the removed blocks' seeds in ascending order, concatenated.
    """
    removed = schedule.removed(survivors)
    if not removed:
        return None
    seeds = chain_seeds(top, schedule)
    if schedule.uses_blocks:
        return b"".join(seeds[j] for j in removed)
    return seeds[removed[-1]]


def seeds_from_revealed(
    revealed: bytes, schedule: NoiseSchedule, survivors: int
) -> dict[int, bytes]:
    """The coordinator's side: the seeds of the removed components, and no other.

    W's seed alone, or rungs t..s−1 from seed_{s-1}.
    """
    removed = schedule.removed(survivors)
    if not removed:
        raise ProtocolError(f"survivors={survivors}: there is nothing to reveal")
    if schedule.uses_blocks:
        want = schedule.revealed_length(survivors)
        if not isinstance(revealed, bytes) or len(revealed) != want:
            raise ProtocolError(f"revealed seeds: must be {want} bytes")
        return {j: revealed[i * SEED_BYTES : (i + 1) * SEED_BYTES] for i, j in enumerate(removed)}
    if removed[-1] == schedule.whole:
        return {removed[-1]: _check_seed(revealed, "revealed seed")}
    return _walk_down(_check_seed(revealed, "revealed seed"), removed)


def component_noise(
    seed: bytes, k: int, schedule: NoiseSchedule, dim: int
) -> npt.NDArray[np.int64]:
    """Component k of a holder's noise: Skellam of its variance, drawn from its seed.

    The holder and the coordinator must run the same numpy: its Poisson sampler turns the
    seeded bit stream into the same integers only there (a different sampler leaves some
    excess in the sum, more noise than the target, never less).
    """
    material = hashlib.sha256(_COMPONENT_DOMAIN + k.to_bytes(4, "big") + _check_seed(seed, "seed"))
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(material.digest(), "big")))
    return skellam_noise((dim,), variance=schedule.component_variance(k), rng=rng)


def holder_noise(
    schedule: NoiseSchedule, dim: int, *, rng: np.random.Generator, top: bytes
) -> npt.NDArray[np.int64]:
    """One holder's whole share (variance v/t): base from ``rng`` plus every seeded component."""
    noise = skellam_noise((dim,), variance=schedule.base_variance, rng=rng)
    return _sum_components(chain_seeds(top, schedule), schedule, noise)


def removable_noise(
    revealed: bytes, schedule: NoiseSchedule, survivors: int, dim: int
) -> npt.NDArray[np.int64]:
    """The sum of one survivor's removed components, which the coordinator subtracts."""
    seeds = seeds_from_revealed(revealed, schedule, survivors)
    return _sum_components(seeds, schedule, np.zeros(dim, dtype=np.int64))


def aggregate_variance(schedule: NoiseSchedule, survivors: int, revealed: int) -> float:
    """Noise variance of the sum when ``revealed`` of the ``survivors`` holders revealed.

    Counting every survivor's noise: the target v when every survivor revealed and c = 0
    (s·v/(s − c) with c colluders, of which any s − c honest ones alone carry v); a survivor
    that did not reveal keeps its whole share.
    """
    s = schedule.check_survivors(survivors)
    if isinstance(revealed, bool) or not isinstance(revealed, int) or not 0 <= revealed <= s:
        raise ProtocolError(f"revealed={revealed!r}: must be an integer in 0..{s}")
    return revealed * schedule.kept_variance(s) + (s - revealed) * schedule.share_variance


def excess_noise(
    top: bytes, schedule: NoiseSchedule, survivors: int, dim: int
) -> npt.NDArray[np.int64] | None:
    """A survivor's own sum of its removed components (what it uploads when asked).

    The same vector the coordinator would redraw from :func:`revealed_seed`; None when nothing
    is removed.
    """
    removed = schedule.removed(survivors)
    if not removed:
        return None
    seeds = {k: seed for k, seed in chain_seeds(top, schedule).items() if k in removed}
    return _sum_components(seeds, schedule, np.zeros(dim, dtype=np.int64))


def check_removal(requested: str) -> str:
    """``requested`` if it names a removal mode (seed, upload or auto); else a ConfigError."""
    if requested not in (*REMOVAL_MODES, REMOVAL_AUTO):
        choices = ", ".join((*REMOVAL_MODES, REMOVAL_AUTO))
        raise ConfigError(f"noise removal {requested!r}: must be one of {choices}")
    return requested


def removal_mode(requested: str, schedule: NoiseSchedule, survivors: int, dim: int) -> str:
    """How survivors hand over their excess: ``seed`` or ``upload``; ``auto`` picks by cost.

    ``auto`` asks for uploads when the coordinator would otherwise redraw more than
    :data:`AUTO_UPLOAD_SAMPLES` Skellam values (s survivors × their removed components × d:
    one component each when all K survive and W exists, s − t otherwise).
    """
    if check_removal(requested) in REMOVAL_MODES:
        return requested
    draws = survivors * len(schedule.removed(survivors)) * dim
    return REMOVAL_UPLOAD if draws > AUTO_UPLOAD_SAMPLES else REMOVAL_SEED
