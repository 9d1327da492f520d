"""The demo's prior condition alone (a release switched off), on any of the demo's data sets.

The prior is what the releases are measured against: the same model, template, sampling seed
and shots, only without steering. Rerunning it alone, per seed, scores it on the seed's own
split (the split the full demo run of that seed used) without repeating the federation:

    python benchmarks/prior_only.py --seeds 0 1 2 --out bench-prior-bbc \
        -- --corpus bbc_news --samples 80 --backend llamacpp

Everything after ``--`` is a ``fedsynth demo`` option that sets the data or the sampling
(``--corpus``, ``--model``, ``--data``, ``--instruction``, ``--samples``,
``--private-per-label``, ``--max-text-tokens``, ``--shots``, ``--backend``, ``--precision``,
``--top-p``);
``--preset quick`` starts from the demo's quick preset instead of its defaults. Per seed it writes
``seed-N/prior_scores.json`` (the demo's scores of the prior and the TSTR accuracy of as many
real texts) and prints mean ± sd over the seeds; a seed whose file exists is not rerun.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

PRIOR = "prior (eps=0)"
OPTIONS = {
    "--corpus": ("corpus", str),
    "--model": ("model", str),
    "--data": ("data_path", Path),
    "--instruction": ("instruction", str),
    "--samples": ("synthetic_per_label", int),
    "--private-per-label": ("private_per_label", int),
    "--max-text-tokens": ("max_text_tokens", int),
    "--shots": ("shots", int),
    "--backend": ("backend", str),
    "--precision": ("precision", str),
    "--top-p": ("top_p", float),
}


def demo_overrides(argv: list[str]) -> dict[str, Any]:
    """The demo config fields that ``--option value`` pairs set (an unknown option is an error)."""
    if len(argv) % 2:
        raise SystemExit(f"demo options come in pairs, got {argv}")
    out: dict[str, Any] = {}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        if flag not in OPTIONS:
            raise SystemExit(f"{flag}: expected one of {sorted(OPTIONS)}")
        name, kind = OPTIONS[flag]
        out[name] = value.replace("\\n", "\n") if flag == "--instruction" else kind(value)
    return out


def prior_scores(
    seed: int, out: Path, overrides: dict[str, Any], *, preset: str = "default"
) -> dict[str, Any]:
    """The prior's scores on one seed's split (read back when ``prior_scores.json`` exists)."""
    path = out / "prior_scores.json"
    if path.exists():
        scores: dict[str, Any] = json.loads(path.read_text())
        return scores
    from fedsynth.protocol.models import load_model
    from fedsynth.simulations import demo as d

    config = d.demo_config(preset, out_dir=out, seed=seed, **overrides)
    data = d.split_data(config)
    loaded = load_model(config.model)
    d.check_text_length(config, loaded)
    engine = d.generation_engine(config, loaded)

    def progress(done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            print(f"seed {seed}: prior {done}/{total}", flush=True)

    samples = d.prior_samples(config, engine, progress=progress)
    scores = d.evaluate_conditions({PRIOR: samples}, data)[PRIOR]
    real = d.real_reference(data, config.synthetic_per_label)
    result = {"seed": seed, "options": {k: str(v) for k, v in overrides.items()}, **scores}
    result["real_tstr_accuracy"] = real["tstr_accuracy"]
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    """Run the prior for each seed and print each score's mean ± sd."""
    argv = sys.argv[1:] if argv is None else argv
    demo_argv = argv[argv.index("--") + 1 :] if "--" in argv else []
    own_argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", choices=("default", "quick"), default="default")
    args = parser.parse_args(own_argv)
    overrides = demo_overrides(demo_argv)
    rows = [
        prior_scores(s, args.out / f"seed-{s}", overrides, preset=args.preset) for s in args.seeds
    ]
    for key in ("label_fidelity", "tstr_accuracy", "mauve", "self_bleu", "real_tstr_accuracy"):
        values = [float(r[key]) for r in rows if key in r]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        shown = ", ".join(f"{v:.3f}" for v in values)
        print(f"{key}: {statistics.mean(values):.3f} ± {sd:.3f} ({shown})")


if __name__ == "__main__":
    main()
