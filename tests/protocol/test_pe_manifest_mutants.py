"""Tests that pin what mutation testing found unchecked in the PE round manifest.

``scripts/mutmut.sh protocol/pe_manifest.py`` (against the protocol tests of the PE manifest,
the verification and PE) left alive: the lower limits of the manifest's sizes, the field
capacity with its noise term and its edge, the coordinator's range check of a decoded histogram
at both ends, a holder's own wrap check at its edge, and the canonical JSON and terms digest
every signature of the round binds.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from fedsynth.protocol.codec import to_field
from fedsynth.protocol.errors import ConfigError, FieldRangeError
from fedsynth.protocol.manifest import PrivacySpec, noise_margin
from fedsynth.protocol.pe_manifest import decode_histogram, encode_votes
from tests.protocol.test_pe_manifest import LABELS, _manifest, _privacy


def _no_noise() -> PrivacySpec:
    return _privacy(epsilon=math.inf, top_k=1, threshold=2)


def test_the_smallest_sizes_are_accepted() -> None:
    assert _manifest(embedding_dim=1).embedding_dim == 1
    assert _manifest(labels=("only",)).labels == ("only",)
    assert _manifest(per_label=1, top_k=1, privacy=_no_noise()).per_label == 1
    assert _manifest(max_records=1).max_records == 1
    assert _manifest(deadline_s=0.5).deadline_s == 0.5
    with pytest.raises(ConfigError) as caught:
        _manifest(per_label=0, top_k=1, privacy=_no_noise())
    assert "per_label=0: must be >= 1" in str(caught.value)


def test_the_field_capacity_counts_every_vote_and_every_shares_noise() -> None:
    manifest = _manifest()
    k = len(manifest.node_ids)
    noise = noise_margin(manifest.privacy, clients=k)
    assert noise > 1.0
    assert manifest.worst_case_sum() == k * 1000 * manifest.top_k + noise
    # The largest record cap that fits 32 bits, and one more, which does not.
    fits = math.floor((2.0**31 - noise) / (k * manifest.top_k))
    if k * fits * manifest.top_k + noise >= 2.0**31:
        fits -= 1
    assert _manifest(max_records=fits).max_records == fits
    with pytest.raises(ConfigError, match="bits=32 too small"):
        _manifest(max_records=fits + 1)


def test_the_decoded_range_is_what_the_survivors_can_produce() -> None:
    manifest = _manifest()
    survivors = 3
    noise_std = math.sqrt(manifest.privacy.total_variance / manifest.privacy.threshold * survivors)
    upper = survivors * manifest.max_records * manifest.top_k + 40.0 * noise_std + 1.0
    lower = -(40.0 * noise_std + 1.0)

    def decoded(value: float) -> np.ndarray:
        sums = np.zeros(manifest.dim, dtype=np.int64)
        sums[1] = value
        return decode_histogram(
            to_field(sums, bits=manifest.bits), manifest=manifest, survivors=survivors
        )

    assert decoded(math.floor(upper))[1] == math.floor(upper)
    assert decoded(math.ceil(lower))[1] == math.ceil(lower)
    for outside in (math.floor(upper) + 1, math.ceil(lower) - 1):
        with pytest.raises(FieldRangeError) as caught:
            decoded(outside)
        assert str(caught.value).endswith("this round's result is discarded")


def test_a_holder_refuses_votes_at_its_share_of_the_field() -> None:
    manifest = _manifest(bits=16, max_records=10, top_k=1, privacy=_no_noise())
    limit = 2**15 // len(manifest.node_ids)  # 8,192 for four holders
    votes = np.zeros(manifest.dim, dtype=np.int64)
    votes[0] = limit - 1
    encode_votes(votes, manifest=manifest, rng=np.random.default_rng(0))
    votes[0] = limit
    with pytest.raises(FieldRangeError) as caught:
        encode_votes(votes, manifest=manifest, rng=np.random.default_rng(0))
    assert "the task needs more field bits" in str(caught.value)


def test_central_decoding_needs_the_coordinators_rng() -> None:
    privacy = _privacy(mode="central")
    manifest = _manifest(privacy=privacy)
    field_sum = to_field(np.zeros(manifest.dim, dtype=np.int64), bits=manifest.bits)
    with pytest.raises(ConfigError) as caught:
        decode_histogram(field_sum, manifest=manifest, survivors=3)
    assert str(caught.value) == "central mode needs an rng for the coordinator's noise"


def test_the_round_terms_digest_is_the_domain_separated_hash_of_the_canonical_json() -> None:
    manifest = _manifest()
    text = manifest.to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True)
    expected = hashlib.sha256(b"fedsynth/pe-round-terms\x00" + text.encode("utf-8")).hexdigest()
    assert manifest.secagg_config().terms == expected
    assert manifest.labels == LABELS
