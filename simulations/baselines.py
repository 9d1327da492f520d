"""Building blocks of the comparison baselines that are not part of fedsynth's own protocol.

* RPSG-style (private seeds → model rewrite → noisy candidate choice → cosine filter → NLL filter
  → label alignment; Ma & Rajtmajer, arXiv 2604.07486). Its noise covers only which candidate of
  a seed is kept; every output still derives from one private record, so the released text is not
  record-level DP. The filters are empirical defences.
* SafeSynthDP-style noisy in-context learning (arXiv 2412.20641): private records shown as
  in-context examples whose token embeddings are clipped and perturbed with Gaussian or Laplace
  noise before generation. The ε is per token embedding; a record of n tokens shown m times gets
  n·m·ε by composition, so this is not record-level DP at the stated ε either.

The selection, filter and noise functions are pure (numpy), so tests check them directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.models import LoadedModel
from fedsynth.server.generation import GenerationConfig

RPSG_SCORE_WEIGHT = 0.75  # weight of seed similarity vs label agreement in candidate scores
RPSG_COSINE_KEEP = 0.65  # share of candidates kept: the least similar to any private text
RPSG_NLL_KEEP = 0.55  # share kept by the NLL filter: the least "memorized-looking" (high NLL)
NOISE_KINDS = ("gaussian", "laplace")


def classic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float) -> float:
    """σ = Δ·√(2 ln(1.25/δ))/ε, the textbook Gaussian mechanism (Dwork & Roth, Thm A.1).

    The theorem assumes ε < 1; the baselines use it as their papers do, at any ε, and the report
    says so.
    """
    if not epsilon > 0 or not 0 < delta < 1 or not sensitivity > 0:
        raise ConfigError("need ε > 0, 0 < δ < 1 and a positive sensitivity")
    if math.isinf(epsilon):
        return 0.0
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def noisy_argmax(scores: np.ndarray, *, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Index of the best candidate per row after adding N(0, σ²) to every score."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 1:
        raise ConfigError(f"scores must be (seeds, candidates), got {scores.shape}")
    noisy = scores + (rng.normal(scale=sigma, size=scores.shape) if sigma > 0 else 0.0)
    chosen: np.ndarray = noisy.argmax(axis=1)
    return chosen


def rescale_unit(scores: np.ndarray) -> np.ndarray:
    """Min-max rescale to [0, 1] (all-equal scores become 0.5), so sensitivity is 1."""
    scores = np.asarray(scores, dtype=np.float64)
    low, high = float(scores.min()), float(scores.max())
    if high - low < 1e-12:
        return np.full_like(scores, 0.5)
    unit: np.ndarray = (scores - low) / (high - low)
    return unit


def keep_lowest(values: np.ndarray, share: float) -> np.ndarray:
    """Mask keeping the ``share`` of entries with the lowest values (at least one)."""
    values = np.asarray(values, dtype=np.float64)
    if not 0 < share <= 1:
        raise ConfigError(f"share must be in (0, 1], got {share}")
    keep = max(1, math.ceil(share * len(values)))
    mask = np.zeros(len(values), dtype=bool)
    mask[np.argsort(values, kind="stable")[:keep]] = True
    return mask


def keep_highest(values: np.ndarray, share: float) -> np.ndarray:
    """Mask keeping the ``share`` of entries with the highest values (at least one)."""
    return keep_lowest(-np.asarray(values, dtype=np.float64), share)


def perturb_embeddings(
    embeddings: torch.Tensor,
    *,
    epsilon: float,
    delta: float,
    kind: str,
    clip: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Clip each token embedding and add noise, per token embedding.

    Laplace (L1 clip) gives ε-DP and Gaussian (L2 clip) (ε, δ)-DP for replacing one token's
    embedding by any other (sensitivity 2·clip).
    """
    if kind not in NOISE_KINDS:
        raise ConfigError(f"noise kind {kind!r}: expected one of {NOISE_KINDS}")
    if not clip > 0:
        raise ConfigError(f"clip must be > 0, got {clip}")
    x = embeddings.float()
    order = 1 if kind == "laplace" else 2
    norms = torch.linalg.vector_norm(x, ord=order, dim=-1, keepdim=True)
    x = x * torch.clamp(clip / torch.clamp(norms, min=1e-12), max=1.0)
    if math.isinf(epsilon):
        return x
    if kind == "gaussian":
        sigma = classic_gaussian_sigma(epsilon, delta, 2.0 * clip)
        noise = torch.randn(x.shape, generator=generator) * sigma
    else:
        scale = 2.0 * clip / epsilon
        uniform = torch.rand(x.shape, generator=generator) - 0.5
        noise = -scale * torch.sign(uniform) * torch.log1p(-2.0 * uniform.abs())
    return x + noise


@torch.inference_mode()
def generate_after_embeddings(
    loaded: LoadedModel,
    parts: Sequence[tuple[str, Sequence[str], str]],
    *,
    epsilon: float,
    delta: float,
    kind: str,
    config: GenerationConfig,
    seed: int,
) -> list[str]:
    """Sample one continuation per (head, private shots, tail) prompt, shots noised.

    The shots' token embeddings are perturbed; head and tail are public text (template and
    instruction) and enter unchanged. The prompts are sampled ``config.batch_size`` at a time,
    left-padded (one sample at a time took hours per study cell on two cores).
    """
    model, tok = loaded.model, loaded.tokenizer
    embed = model.get_input_embeddings()
    weight_norms = torch.linalg.vector_norm(
        embed.weight.float(), ord=1 if kind == "laplace" else 2, dim=-1
    )
    clip = float(weight_norms.median())
    gen = torch.Generator().manual_seed(seed)
    prompts: list[torch.Tensor] = []
    seeds: list[int] = []
    with torch.inference_mode():
        for head, shots, tail in parts:
            pieces = [embed(torch.tensor([tok.encode(head, add_special_tokens=True)]))[0].float()]
            for shot in shots:
                ids = torch.tensor([tok.encode(shot.strip() + "\n\n", add_special_tokens=False)])
                pieces.append(
                    perturb_embeddings(
                        embed(ids)[0],
                        epsilon=epsilon,
                        delta=delta,
                        kind=kind,
                        clip=clip,
                        generator=gen,
                    )
                )
            tail_ids = torch.tensor([tok.encode(tail, add_special_tokens=False)])
            pieces.append(embed(tail_ids)[0].float())
            prompts.append(torch.cat(pieces).to(embed.weight.dtype))
            seeds.append(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    eos = tok.eos_token_id
    outputs: list[str] = []
    for first in range(0, len(prompts), config.batch_size):
        batch = prompts[first : first + config.batch_size]
        width = max(p.shape[0] for p in batch)
        inputs = torch.zeros((len(batch), width, batch[0].shape[1]), dtype=batch[0].dtype)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, prompt in enumerate(batch):
            inputs[row, width - prompt.shape[0] :] = prompt  # left-padded
            mask[row, width - prompt.shape[0] :] = 1
        torch.manual_seed(seeds[first])
        out = model.generate(
            inputs_embeds=inputs.to(loaded.device),
            attention_mask=mask.to(loaded.device),
            do_sample=True,
            temperature=config.temperature,
            top_p=config.top_p,
            max_new_tokens=config.max_new_tokens,
            pad_token_id=eos if eos is not None else 0,
        )
        for row in range(len(batch)):
            text = tok.decode(out[row], skip_special_tokens=True)
            outputs.append(text.split("\n")[0].strip())
    return outputs
