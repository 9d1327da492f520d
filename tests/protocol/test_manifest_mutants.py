"""Tests that pin what mutation testing found unchecked in the task manifest.

``scripts/mutmut.sh protocol/manifest.py`` (against ``test_manifest.py``, ``test_messages.py``
and ``test_verification.py``) left these changes alive: the reference digest ignoring the
dtype of the same bytes, the default noise sharing, the colluder bound's type and edge, the
field-capacity limit's edge and record term, a threshold equal to K and a one-record cap,
a manifest without ``extra``, the canonical JSON and the domain-separated terms digest that
every secure-sum signature binds, and the refusals' texts.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.manifest import (
    NOISE_EXACT,
    NOISE_PLAIN,
    TaskManifest,
    array_sha256,
    default_noise_sharing,
    noise_margin,
)
from tests.protocol.test_manifest import REFERENCE, manifest, privacy


def test_the_digest_binds_the_dtype_of_the_same_bytes() -> None:
    # The same bytes read as another dtype are other values: a reference sent as int32 bits
    # must not match a float32 reference's digest.
    values = np.arange(6, dtype=np.float32)
    assert values.tobytes() == values.view(np.int32).tobytes()
    assert array_sha256(values) != array_sha256(values.view(np.int32))


def test_exact_sharing_is_the_default_only_where_holders_add_noise_shares() -> None:
    assert default_noise_sharing("distributed", 10.0) == NOISE_EXACT
    assert default_noise_sharing("distributed", 0.5) == NOISE_EXACT
    assert default_noise_sharing("distributed", 0.0) == NOISE_PLAIN
    assert default_noise_sharing("local", 10.0) == NOISE_PLAIN
    assert default_noise_sharing("central", 10.0) == NOISE_PLAIN


@pytest.mark.parametrize("colluders", [True, 1.5, 3, 4, -1])
def test_colluders_are_a_whole_number_below_the_threshold(colluders: object) -> None:
    with pytest.raises(ConfigError) as caught:
        privacy(threshold=3, colluders=colluders)
    assert str(caught.value) == f"colluders={colluders!r}: must be an int with 0 <= c < t=3"


def test_the_largest_colluder_count_is_accepted() -> None:
    assert privacy(threshold=3, colluders=2).colluders == 2


def test_noise_sharing_refusals_name_the_value_and_the_choices() -> None:
    with pytest.raises(ConfigError) as caught:
        privacy(noise_sharing="fancy")
    assert str(caught.value) == "noise_sharing='fancy' must be one of ['plain', 'exact']"
    with pytest.raises(ConfigError) as caught:
        privacy(mode="local", noise_sharing=NOISE_EXACT)
    assert "noise_sharing='exact' applies to distributed mode only, not mode='local'" in str(
        caught.value
    )


def test_a_threshold_of_every_participant_and_a_one_record_cap_are_accepted() -> None:
    every = manifest(privacy=privacy(threshold=3))  # K = 3 node ids
    assert every.privacy.threshold == len(every.node_ids)
    assert manifest(max_records=1).max_records == 1
    # The limits are > 0, not >= 1: a fine scale or a short deadline is the task's choice.
    assert manifest(scale=0.5).scale == 0.5 and manifest(deadline_s=0.5).deadline_s == 0.5
    with pytest.raises(ConfigError, match=r"max_text_tokens=0: must be >= 1"):
        manifest(max_text_tokens=0)
    with pytest.raises(ConfigError, match=r"^task_id must not be empty$"):
        manifest(task_id="")


def test_the_field_capacity_limit_is_exclusive_and_counts_a_record_plus_rounding() -> None:
    # Two holders, one record each, shares of std 1/64 (exact in binary): the worst-case sum
    # is 2 * (scale + 1) + 40 * 2/64 + 1, which is exactly 2^15 at scale = 16,381.875.
    spec = privacy(threshold=2, total_variance=2 / 4096)
    assert noise_margin(spec, clients=2) == 2.25
    at_limit = {"bits": 16, "node_ids": (1, 2), "max_records": 1, "privacy": spec}
    with pytest.raises(ConfigError) as caught:
        manifest(scale=16_381.875, **at_limit)
    assert "worst-case |sum| 3.28e+04 >= 2^15;" in str(caught.value)
    # An eighth of scale below: worst 32,767.75 fits (a record counted as scale + 2 would not,
    # and one counted as scale - 1 would have let the limit itself through above).
    manifest(scale=16_381.75, **at_limit)


def test_a_nonfinite_reference_is_refused_by_name() -> None:
    bad = REFERENCE.copy()
    bad[0, 0, 0] = math.nan
    with pytest.raises(ConfigError) as caught:
        manifest(reference_sha256=array_sha256(bad)).check_reference(bad)
    assert str(caught.value) == "reference holds non-finite values (NaN or inf)"


def test_a_manifest_without_extra_parses_with_none() -> None:
    data = json.loads(manifest().to_json())
    del data["extra"]
    assert TaskManifest.from_json(json.dumps(data)).extra == {}


def test_a_malformed_manifest_is_named_as_such() -> None:
    with pytest.raises(ConfigError, match=r"^malformed task manifest: "):
        TaskManifest.from_json(json.dumps({"version": "1"}))


def test_the_terms_digest_is_the_domain_separated_hash_of_the_canonical_json() -> None:
    # A wire format: holders and coordinators of different versions must derive the same
    # terms, so the JSON is key-sorted and the digest's domain and separator are fixed.
    m = manifest()
    text = m.to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True)
    expected = hashlib.sha256(b"fedsynth/task-terms\x00" + text.encode("utf-8")).hexdigest()
    assert m.secagg_config().terms == expected
