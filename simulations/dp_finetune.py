"""DP fine-tuning baselines: LoRA adapters trained with DP-SGD (Opacus), then sampling.

What is trained: rank-r LoRA adapters (``peft``) on the attention query and value projections
of every decoder block; the base weights stay frozen. Each training example is the class
prompt followed by one private record; the loss is the record's tokens only. DP-SGD clips each
example's gradient to ``max_grad_norm`` and adds Gaussian noise, with Poisson sampling; the
noise multiplier is chosen by Opacus's RDP accountant so that all steps together spend the
target (ε, δ) per record.

The same local step serves DP-FedAvg (:mod:`fedsynth.simulations.dp_fedavg`): every holder runs
DP-SGD on its own records for all rounds, so each record's guarantee is its holder's (parallel
composition); the server only averages adapters.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedsynth.client.data import Record
from fedsynth.protocol.errors import ConfigError
from fedsynth.protocol.features import PromptTemplate
from fedsynth.protocol.models import LoadedModel

LORA_TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class DPTrainSettings:
    """DP-SGD settings (per holder for DP-FedAvg)."""

    epochs: int = 1  # passes over the data (per round for DP-FedAvg)
    batch_size: int = 16  # expected batch size (Poisson sampling)
    learning_rate: float = 2e-3
    max_grad_norm: float = 1.0
    lora_rank: int = 4
    max_tokens: int = 48

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "lora_rank", "max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if not self.learning_rate > 0 or not self.max_grad_norm > 0:
            raise ConfigError("learning_rate and max_grad_norm must be > 0")


def dpsgd_noise_multiplier(
    *, epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """Noise multiplier for ``steps`` Poisson-subsampled Gaussian steps to spend (ε, δ).

    Opacus's RDP accountant; 0 for ε = ∞ (plain clipped SGD, no privacy).
    """
    if math.isinf(epsilon):
        return 0.0
    from opacus.accountants.utils import get_noise_multiplier

    if not 0 < sample_rate <= 1 or steps < 1:
        raise ConfigError(f"sample_rate={sample_rate}, steps={steps}: out of range")
    return float(
        get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps
        )
    )


def dpsgd_epsilon(
    *, noise_multiplier: float, delta: float, sample_rate: float, steps: int
) -> float:
    """ε spent by ``steps`` Poisson-subsampled Gaussian steps (Opacus RDP accountant)."""
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta=delta))


def lora_model(loaded: LoadedModel, *, rank: int) -> torch.nn.Module:
    """A copy of the model with fresh LoRA adapters on q/v projections (base frozen)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(LORA_TARGETS),
        lora_dropout=0.0,
        bias="none",
    )
    base = copy.deepcopy(loaded.model).float()
    return get_peft_model(base, config)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable LoRA weights (what DP-FedAvg holders upload)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Overwrite the LoRA weights (names as in :func:`adapter_state`)."""
    params = dict(model.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise ConfigError(f"unknown adapter weights {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def encode_examples(
    loaded: LoadedModel, records: Sequence[Record], template: PromptTemplate, max_tokens: int
) -> torch.utils.data.TensorDataset:
    """Token ids, attention mask and loss mask (record tokens only) for every record."""
    tok = loaded.tokenizer
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0)
    rows = []
    for record in records:
        prompt = list(tok.encode(template.prefix(record.label), add_special_tokens=True))
        text = list(tok.encode(record.text.strip(), add_special_tokens=False))
        ids = (prompt + text)[:max_tokens]
        target = ([0] * len(prompt) + [1] * len(text))[:max_tokens]
        rows.append((ids, target))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (ids, target) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        loss_mask[i, : len(ids)] = torch.tensor(target, dtype=torch.float32)
    return torch.utils.data.TensorDataset(input_ids, attention, loss_mask)


def _per_example_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over each example's record tokens (examples do not interact)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    m = mask[:, 1:]
    return (nll * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def dp_train(
    model: torch.nn.Module,
    dataset: torch.utils.data.TensorDataset,
    *,
    settings: DPTrainSettings,
    noise_multiplier: float,
    epochs: int,
    seed: int,
) -> int:
    """Run DP-SGD on the adapters of ``model`` in place; return the number of steps taken."""
    from opacus import PrivacyEngine

    torch.manual_seed(seed)
    n = len(dataset)
    batch = min(settings.batch_size, n)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=settings.learning_rate)
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    module, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        poisson_sampling=True,
    )
    module.train()
    steps = 0
    for _ in range(epochs):
        for ids, attention, mask in loader:
            optimizer.zero_grad()
            if len(ids) == 0:  # Poisson sampling can draw an empty batch: still one DP step
                optimizer.step()
                steps += 1
                continue
            logits = module(input_ids=ids, attention_mask=attention).logits
            loss: torch.Tensor = _per_example_loss(logits, ids, mask).mean()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            steps += 1
    module.eval()
    close = getattr(module, "_close", None)  # drop Opacus's hooks from the wrapped model
    if close is not None:
        close()
    return steps


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Opacus's Poisson loader draws ``1 / sample_rate`` batches per epoch."""
    return max(1, round(n / min(batch_size, n)))


def merged_model(peft_model: torch.nn.Module, loaded: LoadedModel) -> LoadedModel:
    """The fine-tuned model as a plain LoadedModel (adapters merged) for generation."""
    merged = peft_model.merge_and_unload()  # type: ignore[operator]
    merged.eval()
    return LoadedModel(
        name=f"{loaded.name}+dp-lora",
        model=merged,
        tokenizer=loaded.tokenizer,
        fingerprint=loaded.fingerprint + "+dp-lora",
        device=loaded.device,
    )


def finetune_pooled(
    loaded: LoadedModel,
    records: Sequence[Record],
    template: PromptTemplate,
    *,
    epsilon: float,
    delta: float,
    settings: DPTrainSettings,
    seed: int,
) -> tuple[LoadedModel, dict[str, float]]:
    """DP-SGD on the pooled records; returns the merged model and its privacy figures."""
    dataset = encode_examples(loaded, records, template, settings.max_tokens)
    n = len(dataset)
    sample_rate = min(settings.batch_size, n) / n
    steps = steps_per_epoch(n, settings.batch_size) * settings.epochs
    sigma = dpsgd_noise_multiplier(
        epsilon=epsilon, delta=delta, sample_rate=sample_rate, steps=steps
    )
    model = lora_model(loaded, rank=settings.lora_rank)
    taken = dp_train(
        model,
        dataset,
        settings=settings,
        noise_multiplier=sigma,
        epochs=settings.epochs,
        seed=seed,
    )
    spent = dpsgd_epsilon(noise_multiplier=sigma, delta=delta, sample_rate=sample_rate, steps=taken)
    trainable = sum(int(np.prod(p.shape)) for p in adapter_state(model).values())
    return merged_model(model, loaded), {
        "noise_multiplier": sigma,
        "epsilon_spent": spent,
        "steps": float(taken),
        "trainable_parameters": float(trainable),
    }
