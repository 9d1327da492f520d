"""Pure math of a dataset-vector contribution: from features to field elements and back.

Client side (per record, add/remove adjacency, EPSVec arXiv 2602.21218 with distributed DP from
Agarwal, Kairouz, Liu 2021, arXiv 2110.04995): the difference to the class reference is clipped
to norm 1 per layer (unit domain), a count coordinate ``gamma`` is appended, the row is scaled and
randomly rounded ON ITS OWN (re-rounded until its norm is within the rounding-inflated bound the
accountant assumes), rows are summed per class, the client's Skellam noise share is added, and
the result is embedded in the field Z_{2^bits}.

Coordinator side: the secure sum of all survivors is lifted back to signed integers, divided by
the scale, optionally given central Gaussian noise, and turned into per-class mean vectors by
dividing by the noisy count and multiplying each layer by its clip norm.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from fedsynth.protocol.accounting import vector_record_sensitivity
from fedsynth.protocol.codec import field_sub, from_field, to_field
from fedsynth.protocol.errors import ConfigError, FieldRangeError, ShapeError
from fedsynth.protocol.exact_noise import NoiseSchedule, holder_noise, removable_noise
from fedsynth.protocol.features import clip_to_unit
from fedsynth.protocol.manifest import (
    NOISE_EXACT,
    PrivacySpec,
    TaskManifest,
    noise_share_variance,
)
from fedsynth.protocol.mechanisms import TrustMode, gaussian_noise, skellam_noise


def conditional_round(
    rows: np.ndarray, *, l2_bound: float, rng: np.random.Generator, max_tries: int = 1000
) -> np.ndarray:
    """Unbiased randomized rounding of each row, repeated until the row's norm is <= l2_bound.

    Args:
        rows: (n, d) float64 scaled values.

    Returns:
        (n, d) int64.
    """
    floor = np.floor(rows)
    frac = rows - floor
    out = (floor + (rng.random(rows.shape) < frac)).astype(np.int64)
    todo = np.nonzero(np.linalg.norm(out, axis=1) > l2_bound)[0]
    tries = 0
    while len(todo) and tries < max_tries:
        redraw = floor[todo] + (rng.random((len(todo), rows.shape[1])) < frac[todo])
        out[todo] = redraw.astype(np.int64)
        todo = todo[np.linalg.norm(out[todo], axis=1) > l2_bound]
        tries += 1
    if len(todo):
        raise FieldRangeError(
            f"{len(todo)} rows could not be rounded within l2_bound={l2_bound} after "
            f"{max_tries} tries"
        )
    result: np.ndarray = out
    return result


def record_l2_bound(manifest: TaskManifest) -> float:
    """The rounding-inflated per-record L2 bound the accountant assumes for this task.

    Every record is rounded within it in every trust mode (central included), so it is the
    add/remove L2 sensitivity of the release in the scaled integer domain.
    """
    l2, _ = vector_record_sensitivity(
        scale=manifest.scale,
        layers=len(manifest.layers),
        count_weight=manifest.count_weight,
        dim=manifest.row_dim,
    )
    return l2


def integer_class_sums(
    features: np.ndarray,
    labels: Sequence[str],
    *,
    manifest: TaskManifest,
    reference: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Per-class sums of the clipped, scaled, individually rounded records.

    Sensitivity: adding or removing one record changes one class row by at most
    :func:`record_l2_bound` in L2 norm. The same as one :meth:`ClassSumAccumulator.add` of all
    the records (same rng draws in the same order).

    Args:
        features: (n, L, H) per-example features.
        labels: n labels from the manifest's label set.
        reference: (C, L, H) public per-class reference.

    Returns:
        (C, L*H + 1) int64.
    """
    _check_feature_shape(features, manifest)
    accumulator = ClassSumAccumulator(manifest=manifest, reference=reference)
    accumulator.add(features, labels, rng=rng)
    return accumulator.sums


class ClassSumAccumulator:
    """Running per-class sums of clipped, scaled, individually rounded records.

    A holder feeds its records a batch at a time, so its memory grows with the batch, not with
    the number of its records. Every record is clipped, scaled and rounded on its own (the
    rounding rule of :func:`conditional_round`, within :func:`record_l2_bound`), so the sums
    have the same distribution however the records are batched; for a fixed rng they are equal
    to :func:`integer_class_sums` of all records whenever the rng draws come in the same order
    (one batch, or batches of a single class with no re-rounding).

    Sensitivity: adding or removing one record changes one class row by at most
    :func:`record_l2_bound` in L2 norm (add/remove adjacency, record level).
    """

    def __init__(self, *, manifest: TaskManifest, reference: np.ndarray) -> None:
        """Start empty sums for ``manifest``'s classes against its public ``reference``.

        Raises:
            ShapeError, ConfigError: If the reference does not match the manifest (its shape or
                its hash).
        """
        manifest.check_reference(reference)
        self._manifest = manifest
        self._reference = reference
        self._clip = np.asarray(manifest.clip_norms, dtype=np.float64)
        self._bound = record_l2_bound(manifest)
        self._index = {label: c for c, label in enumerate(manifest.labels)}
        self._sums = np.zeros((len(manifest.labels), manifest.row_dim), dtype=np.int64)
        self._n_records = 0

    @property
    def sums(self) -> np.ndarray:
        """(C, L*H + 1) int64 sums of the records added so far (a copy)."""
        return self._sums.copy()

    @property
    def n_records(self) -> int:
        """How many records were added."""
        return self._n_records

    def add(self, features: np.ndarray, labels: Sequence[str], *, rng: np.random.Generator) -> None:
        """Clip, scale and round each record of a batch and add it to its class's sum.

        Args:
            features: (n, L, H) per-example features of the batch.
            labels: n labels from the manifest's label set.
            rng: The rounding randomness (draws class by class, in label order).

        Raises:
            ShapeError: If the features do not have the manifest's (L, H).
            ConfigError: If a label is not in the manifest.
        """
        manifest = self._manifest
        _check_feature_shape(features, manifest)
        unknown = sorted({label for label in labels if label not in self._index})
        if unknown:
            raise ConfigError(f"labels {unknown} are not in the manifest's {list(manifest.labels)}")
        label_ids = np.array([self._index[label] for label in labels], dtype=np.int64)
        for c in range(len(manifest.labels)):
            members = features[label_ids == c]
            if len(members) == 0:
                continue
            unit = clip_to_unit(members - self._reference[c][None], self._clip).reshape(
                len(members), -1
            )
            rows = (
                np.concatenate([unit, np.full((len(members), 1), manifest.count_weight)], axis=1)
                * manifest.scale
            )  # (n_c, L*H + 1)
            self._sums[c] += conditional_round(rows, l2_bound=self._bound, rng=rng).sum(axis=0)
        self._n_records += len(label_ids)


def _check_feature_shape(features: np.ndarray, manifest: TaskManifest) -> None:
    """Refuse features whose (L, H) differ from the manifest's."""
    _, n_layers, hidden = features.shape
    if (n_layers, hidden) != (len(manifest.layers), manifest.hidden_size):
        raise ShapeError(
            f"features shape {features.shape[1:]} != manifest's "
            f"{(len(manifest.layers), manifest.hidden_size)}"
        )


def noise_schedule(privacy: PrivacySpec, *, clients: int) -> NoiseSchedule | None:
    """The add-then-remove schedule of an exact-sharing task of ``clients`` holders, else None."""
    if privacy.noise_sharing != NOISE_EXACT:
        return None
    # From the share, so that one function says how much noise a holder adds in every mode.
    share = noise_share_variance(privacy)
    return NoiseSchedule(
        total_variance=share * (privacy.threshold - privacy.colluders),
        threshold=privacy.threshold,
        clients=clients,
        colluders=privacy.colluders,
    )


def share_noise(
    privacy: PrivacySpec,
    *,
    clients: int,
    dim: int,
    rng: np.random.Generator,
    noise_seed: bytes | None,
) -> np.ndarray:
    """This holder's whole noise share, variance :func:`noise_share_variance` per coordinate.

    With exact sharing it is drawn as a base part from ``rng`` plus removable components from
    the chain seed ``noise_seed`` (:mod:`fedsynth.protocol.exact_noise`); otherwise from ``rng``.

    Raises:
        ConfigError: If exact sharing is asked for without a chain seed.
    """
    schedule = noise_schedule(privacy, clients=clients)
    if schedule is None:
        return skellam_noise((dim,), variance=noise_share_variance(privacy), rng=rng)
    if noise_seed is None:
        raise ConfigError("exact noise sharing needs this holder's chain seed")
    return holder_noise(schedule, dim, rng=rng, top=noise_seed)


def remove_excess_noise(
    field_sum: np.ndarray,
    revealed: Mapping[int, object],
    *,
    privacy: PrivacySpec,
    clients: int,
    survivors: Sequence[int],
    bits: int,
    uploaded: Mapping[int, np.ndarray] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Subtract each survivor's excess noise from the secure sum (exact sharing).

    ``revealed`` maps a node to the seed its unmask reply carried (the coordinator redraws the
    components from it); ``uploaded`` maps a node to the sum of those components it drew and
    sent itself (decoded; it takes the place of the seed). A seed or sum from a node outside
    ``survivors``, or not of the right size, is ignored, and that survivor's excess stays in
    the sum (more noise, never less). Returns the new sum and the survivors whose excess was
    removed, for the report. Plain sharing: the sum unchanged and no one.
    """
    schedule = noise_schedule(privacy, clients=clients)
    members = set(survivors)
    # The bytes a survivor's reveal must hold; 0 exactly when nothing is removed.
    seed_bytes = 0 if schedule is None else schedule.revealed_length(len(members))
    if schedule is None or seed_bytes == 0:
        return field_sum, []
    dim = int(field_sum.shape[0])
    sums = {
        node: vector
        for node, vector in sorted((uploaded or {}).items())
        if node in members and vector.shape == (dim,)
    }
    seeds = {
        node: seed
        for node, seed in sorted(revealed.items())
        if node in members
        and node not in sums
        and isinstance(seed, bytes)
        and len(seed) == seed_bytes
    }
    if not seeds and not sums:
        return field_sum, []
    excess = np.zeros(dim, dtype=np.int64)
    for vector in sums.values():
        excess += vector.astype(np.int64)

    def excess_of(seed: bytes) -> np.ndarray:
        return removable_noise(seed, schedule, len(members), dim)

    if seeds:
        # numpy's samplers release the GIL: one thread per core redraws the survivors' excess.
        with ThreadPoolExecutor(max_workers=min(len(seeds), os.cpu_count() or 1)) as pool:
            for part in pool.map(excess_of, seeds.values()):
                excess += part
    removed = sorted({*seeds, *sums})
    return field_sub(field_sum, to_field(excess, bits=bits), bits=bits), removed


def client_noise_share_variance(manifest: TaskManifest) -> float:
    """Skellam variance this client adds per coordinate of a dataset-vector task."""
    return noise_share_variance(manifest.privacy)


def encode_contribution(
    sums: np.ndarray,
    *,
    manifest: TaskManifest,
    rng: np.random.Generator,
    noise_seed: bytes | None = None,
) -> np.ndarray:
    """Add this client's noise share to its integer sums and embed them in the field.

    ``noise_seed``: the chain seed of an exact-sharing task (:func:`share_noise`).

    Returns:
        (dim,) uint64 field elements, ready to be masked.
    """
    if sums.shape != (len(manifest.labels), manifest.row_dim):
        raise ShapeError(f"sums shape {sums.shape} != {(len(manifest.labels), manifest.row_dim)}")
    noisy = sums.reshape(-1) + share_noise(
        manifest.privacy,
        clients=len(manifest.node_ids),
        dim=manifest.dim,
        rng=rng,
        noise_seed=noise_seed,
    )
    limit = 2.0 ** (manifest.bits - 1) / len(manifest.node_ids)
    worst = float(np.abs(noisy).max(initial=0))
    if worst >= limit:
        # The message goes to the coordinator: it must not describe the unmasked values.
        raise FieldRangeError(
            f"this contribution does not fit bits={manifest.bits} for K={len(manifest.node_ids)} "
            "clients without risk of wrapping; the task needs more field bits"
        )
    return to_field(noisy, bits=manifest.bits)


@dataclass(frozen=True)
class DecodedRelease:
    """Per-class dataset vectors decoded from the secure sum.

    Attributes:
        vectors: (C, L, H) float32 mean difference to the reference, in model units.
        counts: (C,) noisy record counts (post-processing of the released count coordinate).
    """

    vectors: np.ndarray
    counts: np.ndarray


def aggregate_noise_std(manifest: TaskManifest, *, survivors: int) -> float:
    """Per-coordinate std of the client noise in the secure sum of ``survivors`` clients.

    distributed: each survivor adds total/t (with exact sharing that is the most there can be,
    if no survivor's excess was removed); local: each adds the total; central: the clients
    add none (the coordinator's noise comes after decoding).
    """
    return math.sqrt(noise_share_variance(manifest.privacy) * survivors)


def check_release_range(ints: np.ndarray, *, manifest: TaskManifest, survivors: int) -> None:
    """Refuse a decoded sum that ``survivors`` honest clients cannot produce.

    Each record adds to its class row a count coordinate in ``[0, gamma * scale + 1)`` and, per
    layer, a block of L2 norm below ``scale + sqrt(H)`` (unit clip, then rounding by < 1 per
    coordinate), both also within :func:`record_l2_bound`. With at most ``max_records`` records
    per survivor, anything beyond that plus a margin of 40 aggregate noise std (per coordinate,
    and ``sqrt(H) + 40`` std for a layer's norm) comes from a corrupt or malicious input or a
    field wrap-around. The message names the class, the coordinate and the limit only.

    Raises:
        FieldRangeError: If a count or a layer norm is outside the honest range.
        ConfigError: If ``survivors`` is not in ``1..K``.
    """
    k = len(manifest.node_ids)
    if (
        isinstance(survivors, bool)
        or not isinstance(survivors, int | np.integer)
        or not (1 <= survivors <= k)
    ):
        raise ConfigError(f"survivors={survivors!r}: must be an integer in 1..K={k}")
    bound = record_l2_bound(manifest)
    hidden = manifest.hidden_size
    records = survivors * manifest.max_records
    std = aggregate_noise_std(manifest, survivors=survivors)
    count_margin = 40.0 * std + 1.0
    count_upper = records * min(bound, manifest.count_weight * manifest.scale + 1.0) + count_margin
    norm_upper = records * min(bound, manifest.scale + math.sqrt(hidden)) + (
        (math.sqrt(hidden) + 40.0) * std + 1.0
    )
    rows = ints.reshape(len(manifest.labels), manifest.row_dim)
    norms = np.linalg.norm(rows[:, :-1].reshape(len(manifest.labels), -1, hidden), axis=-1)
    for c, label in enumerate(manifest.labels):
        if not -count_margin <= rows[c, -1] <= count_upper:
            raise FieldRangeError(
                f"decoded count coordinate of class {label!r} is outside the range {survivors} "
                f"honest clients can produce ([{-count_margin:.6g}, {count_upper:.6g}]); a "
                "client sent a malformed input and this release is discarded"
            )
        for layer, norm in zip(manifest.layers, norms[c], strict=True):
            if not norm <= norm_upper:
                raise FieldRangeError(
                    f"decoded sum of class {label!r}, layer {layer} has an L2 norm above what "
                    f"{survivors} honest clients can produce (limit {norm_upper:.6g}); a client "
                    "sent a malformed input and this release is discarded"
                )


def decode_release(
    field_sum: np.ndarray,
    *,
    manifest: TaskManifest,
    survivors: int,
    rng: np.random.Generator | None = None,
    min_count: float = 1.0,
) -> DecodedRelease:
    """Turn the secure sum into per-class mean vectors (post-processing, plus central noise).

    The sum of ``survivors`` clients is first checked against what they can honestly produce
    (:func:`check_release_range`). In central mode the trusted coordinator then adds Gaussian
    noise of the manifest's variance here (scaled domain, joint-vector sensitivity); ``rng``
    must then be given.

    Raises:
        FieldRangeError: A decoded count or layer norm outside the survivors' honest range.
    """
    ints = from_field(field_sum, bits=manifest.bits).astype(np.float64)
    if ints.shape != (manifest.dim,):
        raise ShapeError(f"sum shape {ints.shape} != ({manifest.dim},)")
    check_release_range(ints, manifest=manifest, survivors=survivors)
    if TrustMode(manifest.privacy.mode) is TrustMode.CENTRAL and manifest.privacy.total_variance:
        if rng is None:
            raise ConfigError("central mode needs an rng for the coordinator's noise")
        ints = ints + gaussian_noise(
            ints.shape, std=math.sqrt(manifest.privacy.total_variance), rng=rng
        )
    rows = ints.reshape(len(manifest.labels), manifest.row_dim) / manifest.scale
    counts = np.maximum(rows[:, -1] / manifest.count_weight, min_count)
    n_layers = len(manifest.layers)
    unit_means = rows[:, :-1].reshape(-1, n_layers, manifest.hidden_size) / counts[:, None, None]
    clip = np.asarray(manifest.clip_norms, dtype=np.float64)
    vectors = (unit_means * clip[None, :, None]).astype(np.float32)
    return DecodedRelease(vectors=vectors, counts=counts)
