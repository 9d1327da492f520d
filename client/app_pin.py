"""The app bundle a holder's node trusts: pinned by SHA-256 and fedsynth version.

In a Flower deployment every run ships an app bundle (a FAB: a zip of the app's source and its
``pyproject.toml``) that the coordinator builds. Flower's own client runtime installs that
bundle and imports the ClientApp it names, so a coordinator could ship client code that uploads
raw records. A fedsynth node instead pins the bundles it accepts: the SHA-256 of the ``.fab``
file (what ``flwr build`` writes and ``sha256sum`` prints) plus the fedsynth version installed
on the node. A task whose bundle matches neither is refused before anything in the bundle is
extracted or imported; a matching task runs the holder's *installed* fedsynth ClientApp, never
the bundle's copy of it (see :mod:`fedsynth.client.pinned_runtime`).

Flower's ``--trusted-entities`` (publisher signatures on FABs) does not fit here: in flwr 1.41
a SuperLink attaches signatures only to apps fetched from Flower Hub, so every bundle a
consortium's coordinator submits from its own machine arrives unsigned and would be refused.

The default pin is the bundle built, exactly as ``flwr build`` builds it, from the source tree
of the fedsynth installed on the node (an install from a checkout); the operator computes the
same hash with ``flwr build`` + ``sha256sum`` in a clean checkout of the same release.

Everything here is pure apart from reading the pin file and building a bundle from disk.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tomllib
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Final

from fedsynth.protocol.errors import AppNotTrustedError, ConfigError

__all__ = [
    "APP_NAME",
    "PIN_FILE",
    "TrustedApp",
    "build_bundle",
    "bundle_metadata",
    "check_bundle",
    "collect_app_files",
    "default_pin_hash",
    "installed_source_root",
    "installed_version",
    "load_pin_file",
    "parse_trusted_app",
    "pin_file_text",
    "pin_hashes",
    "resolve_pin",
    "sha256_hex",
    "write_pin_file",
]

APP_NAME: Final = "fedsynth"
"""``[project].name`` of the fedsynth app bundle."""

PIN_FILE: Final = "trusted-app.toml"
"""The pin file in a node directory."""

MAX_BUNDLE_BYTES: Final = 10 * 1024 * 1024
"""Flower's own limit on a FAB's size; a larger bundle is refused before it is opened."""

_HEX64: Final = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TrustedApp:
    """What a node runs: bundles with one of ``fab_sha256``, of fedsynth ``version``.

    Attributes:
        fab_sha256: Hex SHA-256 digests of the ``.fab`` files the holder accepts.
        version: The fedsynth version installed on the node; a bundle of another version is
            refused even if its hash is pinned (the node runs its installed ClientApp, which
            speaks this version's protocol).
    """

    fab_sha256: frozenset[str]
    version: str

    def describe(self) -> str:
        """``fedsynth <version>, sha256 <h1>, <h2>`` for logs and ``node status``."""
        return f"{APP_NAME} {self.version}, sha256 {', '.join(sorted(self.fab_sha256))}"


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``: how Flower names a FAB, and what ``sha256sum`` prints."""
    return hashlib.sha256(data).hexdigest()


def installed_version() -> str:
    """The version of the fedsynth distribution installed in this interpreter.

    Raises:
        ConfigError: fedsynth is not installed as a distribution (only importable from a path).
    """
    try:
        return metadata.version(APP_NAME)
    except metadata.PackageNotFoundError:
        raise ConfigError(
            f"installed version of {APP_NAME}: not installed as a package (pip install -e .)"
        ) from None


def installed_source_root() -> Path | None:
    """The source tree the installed fedsynth was installed from, if this is such an install.

    The role directories (``client/``, ``protocol/``, ...) sit beside ``pyproject.toml`` in a
    checkout; an install from a wheel has no ``pyproject.toml`` there and gives ``None``.
    """
    import fedsynth.client as client_package

    root = Path(client_package.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        return None
    try:
        config = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    if config.get("project", {}).get("name") != APP_NAME:
        return None
    return root


def collect_app_files(directory: Path) -> dict[str, Path]:
    """The files ``flwr build`` considers, without walking directories it would drop whole.

    Flower walks every file under the app directory (a checkout's ``.venv`` included) and
    filters afterwards. Here a directory is not entered when the app's ``.gitignore`` (without
    negated patterns, which could re-include a file below it) or Flower's own publish
    exclusions drop it as a whole; everything else is handed to Flower's filters unchanged, so
    the bundle and its hash are the ones ``flwr build`` gives.
    """
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns
    from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS

    root = Path(directory).expanduser().resolve()
    ignore = load_gitignore_patterns(root / ".gitignore")
    specs = [build_pathspec(APP_PUBLISH_EXCLUDE_PATTERNS)]
    if not any(p.startswith("!") for p in ignore):
        specs.append(build_pathspec(ignore))
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        rel_dir = base.relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [
            d for d in dirnames if not any(spec.match_file(f"{prefix}{d}/") for spec in specs)
        ]
        for name in filenames:
            path = base / name
            if path.is_symlink() or not path.resolve().is_relative_to(root):
                continue
            files[prefix + name] = path
    return files


def build_bundle(directory: Path) -> bytes:
    """The FAB bytes ``flwr build`` / ``flwr run`` build from ``directory`` (deterministic).

    Raises:
        ConfigError: The directory is not a Flower app (the message names it and Flower's
            reason).
    """
    from flwr.cli.build import build_fab_from_files

    try:
        return build_fab_from_files(collect_app_files(directory))[0]
    except (ValueError, OSError) as exc:
        raise ConfigError(f"app bundle from {directory}: cannot build it ({exc})") from None


def default_pin_hash() -> str:
    """SHA-256 of the bundle built from the installed fedsynth's source tree.

    Raises:
        ConfigError: fedsynth was not installed from a source tree (then the holder must pass
            the hash of the release it trusts).
    """
    root = installed_source_root()
    if root is None:
        raise ConfigError(
            f"trusted app: the installed {APP_NAME} has no source tree to build its app bundle "
            "from (installed from a wheel); pass --trusted-app with the SHA-256 of the "
            "release's .fab (flwr build + sha256sum in a clean checkout of that release)"
        )
    return sha256_hex(build_bundle(root))


def parse_trusted_app(value: str) -> str:
    """A ``--trusted-app`` value as a hex SHA-256: the hash itself, a ``.fab`` file or an app dir.

    Raises:
        ConfigError: The value is none of these (the message names it).
    """
    text = value.strip()
    if text.lower().startswith("sha256:"):
        text = text[len("sha256:") :]
    if _HEX64.fullmatch(text.lower()):
        return text.lower()
    path = Path(value).expanduser()
    if path.is_file():
        data = path.read_bytes()
        if len(data) > MAX_BUNDLE_BYTES:
            raise ConfigError(
                f"--trusted-app {value}: {len(data)} bytes, above the {MAX_BUNDLE_BYTES}-byte "
                "limit of an app bundle"
            )
        return sha256_hex(data)
    if path.is_dir():
        return sha256_hex(build_bundle(path))
    raise ConfigError(
        f"--trusted-app {value!r}: neither a 64-digit hex SHA-256, nor a .fab file, nor an app "
        "directory"
    )


def pin_hashes(values: list[str]) -> frozenset[str]:
    """``--trusted-app`` values (hashes, ``.fab`` files, app directories) as hex digests.

    Raises:
        ConfigError: A value is none of these.
    """
    return frozenset(parse_trusted_app(v) for v in values)


def pin_file_text(hashes: frozenset[str] | set[str] | list[str]) -> str:
    """The pin file's TOML: one ``fab_sha256`` list, sorted."""
    lines = [
        "# App bundles this node runs: SHA-256 of the .fab (flwr build + sha256sum).",
        "# A run whose bundle is not listed is refused before its code is opened.",
        "fab_sha256 = [",
        *(f'    "{h}",' for h in sorted(set(hashes))),
        "]",
    ]
    return "\n".join(lines) + "\n"


def write_pin_file(path: Path, hashes: frozenset[str] | set[str] | list[str]) -> None:
    """Write the pin file (it holds no secret; only the holder's 0700 directory can change it).

    Raises:
        ConfigError: A hash is not 64 lowercase hex digits.
    """
    for h in hashes:
        if not _HEX64.fullmatch(h):
            raise ConfigError(f"fab_sha256 {h!r}: not 64 lowercase hex digits")
    Path(path).write_text(pin_file_text(hashes), encoding="utf-8")


def load_pin_file(path: Path) -> frozenset[str]:
    """The hashes a pin file lists.

    Raises:
        ConfigError: The file does not parse, has another key, or a hash is malformed; an empty
            list is refused too (it would refuse every run while looking configured).
    """
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"pin file {path}: cannot read ({exc.strerror})") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"pin file {path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - {"fab_sha256"})
    if unknown:
        raise ConfigError(f"pin file {path}: unknown key {unknown[0]!r} (only fab_sha256)")
    hashes = data.get("fab_sha256")
    if not isinstance(hashes, list) or not hashes:
        raise ConfigError(f"pin file {path}: fab_sha256 must be a non-empty list of hex digests")
    for h in hashes:
        if not isinstance(h, str) or not _HEX64.fullmatch(h):
            raise ConfigError(f"pin file {path}: fab_sha256 entry {h!r} is not 64 lowercase hex")
    return frozenset(hashes)


def resolve_pin(pin_file: Path, trusted_apps: list[str] | None = None) -> TrustedApp:
    """The node's pin: ``--trusted-app`` values, else the pin file, else the installed source.

    Raises:
        ConfigError: A value or the pin file is refused, or there is nothing to pin (no value,
            no pin file, no source tree).
    """
    if trusted_apps:
        hashes = pin_hashes(trusted_apps)
    elif Path(pin_file).is_file():
        hashes = load_pin_file(pin_file)
    else:
        hashes = frozenset({default_pin_hash()})
    return TrustedApp(fab_sha256=hashes, version=installed_version())


def bundle_metadata(content: bytes) -> tuple[str, str]:
    """``([project].name, [project].version)`` of a bundle, read from its zip without extracting.

    Raises:
        AppNotTrustedError: The bundle is not a zip holding a parsable ``pyproject.toml``.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            info = archive.getinfo("pyproject.toml")
            if info.file_size > 1024 * 1024:
                raise AppNotTrustedError(
                    f"app bundle pyproject.toml: {info.file_size} bytes, above 1 MiB"
                )
            config = tomllib.loads(archive.read(info).decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AppNotTrustedError(f"app bundle: no readable pyproject.toml ({exc})") from None
    project = config.get("project")
    if not isinstance(project, dict):
        raise AppNotTrustedError("app bundle pyproject.toml: no [project] table")
    return str(project.get("name", "")), str(project.get("version", ""))


def check_bundle(content: bytes, claimed_hash: str, pin: TrustedApp) -> str:
    """Refuse any bundle but a pinned fedsynth bundle of the installed version; return its hash.

    The hash is computed here from the bytes received, never taken from the run's metadata
    (which the coordinator's SuperLink writes). Only the zip's ``pyproject.toml`` is read, and
    only after the hash matched; nothing is extracted and no code is imported.

    Raises:
        AppNotTrustedError: The bundle is too large, its hash differs from the one the run
            claims, is not pinned, or its name or version is not the installed fedsynth's.
    """
    if len(content) > MAX_BUNDLE_BYTES:
        raise AppNotTrustedError(
            f"app bundle: {len(content)} bytes, above the {MAX_BUNDLE_BYTES}-byte limit"
        )
    actual = sha256_hex(content)
    if claimed_hash and claimed_hash.lower() != actual:
        raise AppNotTrustedError(
            f"app bundle sha256 {actual} differs from the hash the run names ({claimed_hash})"
        )
    if actual not in pin.fab_sha256:
        raise AppNotTrustedError(
            f"app bundle sha256 {actual} is not pinned by this node (it runs only {pin.describe()})"
        )
    name, version = bundle_metadata(content)
    if name != APP_NAME or version != pin.version:
        raise AppNotTrustedError(
            f"app bundle is {name} {version}; this node runs only {APP_NAME} {pin.version}"
        )
    return actual
