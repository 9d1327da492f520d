"""Steering on the real default model with what the system releases: a class vector decoded from
a real secure sum (clipped, per-record rounded, noisy count, signed keys, consistency round) makes
that class's real held-out texts likelier.

The release is the ε = ∞ ceiling of the same path: at ε = 4 with the 250 records per label this
test can afford, the noise is about as large as the class-specific signal (one run: mean gain
-0.011 nats per token), so a likelihood test there measures the noise draw, not the steering.
The ε = 4 utility is checked end to end at the demo's full private size (tests/test_e2e_demo.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedsynth.protocol.contribution import decode_release, encode_contribution, integer_class_sums
from fedsynth.protocol.features import FeatureSpec, extract_features
from fedsynth.protocol.identity import HolderIdentity, Roster
from fedsynth.protocol.manifest import TaskManifest
from fedsynth.protocol.secagg import SecAggClient, SecAggServer
from fedsynth.server.coordinator import TaskConfig, build_manifest, compute_public_reference
from fedsynth.server.generation import GenerationConfig, text_logprobs
from fedsynth.server.release import Release
from fedsynth.server.synthesize import label_deltas
from fedsynth.simulations.datasets import load_corpus, split_train_test, subsample_per_label
from fedsynth.simulations.demo import TEMPLATES

pytestmark = pytest.mark.slow

# Moderate steering (0.02 x the typical residual norm): the text stays natural and closer to
# the class's real texts. Much stronger steering (0.05) trades likelihood of real text for class
# signal; the demo default is 0.03.
STRENGTH = 0.02
NODES = (1, 2, 3)  # three holders, default threshold t = 2


@pytest.fixture(scope="module")
def model():
    from fedsynth.protocol.models import load_model

    return load_model()


def secure_release(
    manifest: TaskManifest,
    reference: np.ndarray,
    holders: list[tuple[np.ndarray, list[str]]],
    *,
    seed: int,
) -> Release:
    """What the coordinator releases: each holder's rounded class sums plus its noise share,
    masked and summed by the real secure-sum protocol, decoded by the coordinator."""
    rng = np.random.default_rng(seed)
    inputs = {
        node: encode_contribution(
            integer_class_sums(features, labels, manifest=manifest, reference=reference, rng=rng),
            manifest=manifest,
            rng=rng,
        )
        for node, (features, labels) in zip(manifest.node_ids, holders, strict=True)
    }
    config = manifest.secagg_config()
    identities = {n: HolderIdentity.generate(f"holder-{n}") for n in manifest.node_ids}
    roster = Roster({i.name: i.public_key for i in identities.values()})
    clients = {
        n: SecAggClient(n, config, identity=identities[n], roster=roster) for n in manifest.node_ids
    }
    server = SecAggServer(config, roster=roster)
    u1 = server.receive_public_keys({n: c.setup() for n, c in clients.items()})
    routed = server.route_shares({n: clients[n].share_keys(u1) for n in u1})
    for n, ciphertexts in routed.items():
        masked = clients[n].masked_input(ciphertexts, inputs[n])
        # The coordinator only ever holds masked vectors.
        assert not np.array_equal(masked, inputs[n])
        server.receive_masked_input(n, masked)
    survivors, dropped = server.close_masked_inputs()
    signatures = server.receive_signatures(
        {n: clients[n].consistency(survivors) for n in survivors}
    )
    total = server.unmask(
        {n: clients[n].unmask(survivors, dropped, signatures=signatures) for n in server.signers}
    )
    decoded = decode_release(total, manifest=manifest, survivors=len(survivors), rng=rng)
    return Release(
        release_id="steering-test",
        manifest=manifest,
        vectors=decoded.vectors,
        counts=decoded.counts,
        report={},
    )


def test_released_class_vector_raises_heldout_logprob(model) -> None:
    template = TEMPLATES["rotten_tomatoes"]
    layers = (8, 9, 10, 11)
    corpus = load_corpus("rotten_tomatoes")
    train, test = split_train_test(corpus.records, test_fraction=0.15, seed=0)
    private = subsample_per_label(train, per_label=250, seed=3)
    heldout = subsample_per_label(test, per_label=30, seed=4)
    task = TaskConfig(
        template=template,
        layers=layers,
        epsilon=math.inf,
        prior_per_label=40,
        prior_generation=GenerationConfig(max_new_tokens=48, batch_size=64),
    )
    reference = compute_public_reference(model, task)
    manifest = build_manifest(task, model, reference, NODES)
    assert math.isinf(manifest.privacy.epsilon) and manifest.privacy.mode == "distributed"
    # Each holder computes its features as a client does (the manifest's feature function).
    spec = manifest.feature_spec
    feats, _ = extract_features(
        model,
        [r.text for r in private],
        [r.label for r in private],
        FeatureSpec(spec.template, spec.layers, spec.max_text_tokens, 32),
    )
    labels = [r.label for r in private]
    parts = np.array_split(np.random.default_rng(5).permutation(len(private)), len(NODES))
    holders = [(feats[idx], [labels[i] for i in idx]) for idx in parts]
    release = secure_release(manifest, reference.means, holders, seed=6)
    # The release is the clipped, rounded one, not the plain mean the holders' data would give.
    plain = (
        np.stack([feats[np.array(labels) == label].mean(axis=0) for label in template.labels])
        - reference.means
    )
    assert not np.allclose(release.vectors, plain, atol=1e-3)
    for label in template.labels:
        # Exactly the steering generation applies for this label (fedsynth generate).
        deltas = label_deltas(release, label, strength=STRENGTH)
        texts = [r.text for r in heldout if r.label == label]
        prompt = template.prefix(label)
        plain_lp = np.array(text_logprobs(model, prompt, texts))
        steered_lp = np.array(text_logprobs(model, prompt, texts, deltas=deltas))
        gain = steered_lp - plain_lp
        # Paired one-sided test: the steered model assigns higher log-probability.
        p = stats.ttest_1samp(gain, 0.0, alternative="greater").pvalue
        assert gain.mean() > 0, (label, gain.mean())
        assert p < 0.01, (label, p, gain.mean())
