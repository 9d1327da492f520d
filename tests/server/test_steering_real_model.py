"""Steering on the real default model: a class vector makes that class's real texts likelier."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedsynth.protocol.features import FeatureSpec, extract_features
from fedsynth.server.coordinator import TaskConfig, compute_public_reference
from fedsynth.server.generation import GenerationConfig, steering_deltas, text_logprobs
from fedsynth.simulations.datasets import load_corpus, split_train_test, subsample_per_label
from fedsynth.simulations.demo import TEMPLATES

pytestmark = pytest.mark.slow

# Moderate steering (0.02 x the typical residual norm, about 0.2 x the vector's own norm):
# the text stays natural and closer to the class's real texts. Much stronger steering
# (0.05) trades likelihood of real text for class signal; the demo default is 0.03.
STRENGTH = 0.02


@pytest.fixture(scope="module")
def model():
    from fedsynth.protocol.models import load_model

    return load_model()


def test_class_vector_raises_heldout_logprob(model) -> None:
    template = TEMPLATES["rotten_tomatoes"]
    layers = (8, 9, 10, 11)
    corpus = load_corpus("rotten_tomatoes")
    train, test = split_train_test(corpus.records, test_fraction=0.15, seed=0)
    private = subsample_per_label(train, per_label=250, seed=3)
    heldout = subsample_per_label(test, per_label=30, seed=4)
    spec = FeatureSpec(template, layers, 64, 32)
    feats, _ = extract_features(model, [r.text for r in private], [r.label for r in private], spec)
    labels = np.array([r.label for r in private])
    # The system's own class vector: private class mean minus the public prior reference.
    reference = compute_public_reference(
        model,
        TaskConfig(
            template=template,
            layers=layers,
            prior_per_label=40,
            prior_generation=GenerationConfig(max_new_tokens=48, batch_size=64),
        ),
    )
    residual = dict(zip(layers, reference.residual_norms, strict=True))
    import torch

    for label in template.labels:
        c = template.labels.index(label)
        vector = feats[labels == label].mean(axis=0) - reference.means[c]  # (L, H)
        deltas = steering_deltas(
            {layer: torch.from_numpy(vector[j]) for j, layer in enumerate(layers)},
            strength=STRENGTH,
            residual_norms=residual,
        )
        texts = [r.text for r in heldout if r.label == label]
        prompt = template.prefix(label)
        plain = np.array(text_logprobs(model, prompt, texts))
        steered = np.array(text_logprobs(model, prompt, texts, deltas=deltas))
        gain = steered - plain
        # Paired one-sided test: the steered model assigns higher log-probability.
        p = stats.ttest_1samp(gain, 0.0, alternative="greater").pvalue
        assert gain.mean() > 0, (label, gain.mean())
        assert p < 0.01, (label, p, gain.mean())
