"""The app pin: the hash a node computes, the bundles it refuses, and what runs after the check."""

from __future__ import annotations

import io
import os
import stat
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.cli.build import build_fab_from_disk

from fedsynth.client import app_pin, pinned_runtime
from fedsynth.client.app_pin import (
    TrustedApp,
    build_bundle,
    check_bundle,
    load_pin_file,
    parse_trusted_app,
    resolve_pin,
    sha256_hex,
    write_pin_file,
)
from fedsynth.client.node_dir import NodePaths, ensure_superexec_secret
from fedsynth.client.supernode import RUNTIME_HOST, supernode_command
from fedsynth.protocol.errors import AppNotTrustedError, ConfigError, IdentityError

VERSION = "9.8.7"


def _app(directory: Path, *, client_line: str = "app = None", version: str = VERSION) -> Path:
    directory.mkdir(parents=True)
    (directory / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "fedsynth"\nversion = "{version}"\ndependencies = []\n'
        '[tool.flwr.app]\npublisher = "fedsynth"\n'
        '[tool.flwr.app.components]\nserverapp = "srv:app"\nclientapp = "cli:app"\n'
        "[tool.flwr.app.config]\nx = 1\n"
    )
    (directory / "srv.py").write_text("app = None\n")
    (directory / "cli.py").write_text(f"{client_line}\n")
    return directory


def _pin(*bundles: bytes, version: str = VERSION) -> TrustedApp:
    return TrustedApp(frozenset(sha256_hex(b) for b in bundles), version)


def test_hash_is_the_one_flwr_build_gives_even_with_ignored_and_cache_dirs(tmp_path: Path) -> None:
    app = _app(tmp_path / "app")
    (app / ".gitignore").write_text("build/\n*.log\nsecret_dir\n")
    for rel in (
        ".venv/lib/site.py",
        "build/out.py",
        "pkg/__pycache__/m.py",
        "pkg/mod.py",
        "pkg/deep/a/b/c.toml",
        "secret_dir/x.py",
        "notes.md",
        "data.json",
    ):
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(f"# {rel}\n")
    os.symlink(app / "pkg", app / "linked")
    assert build_bundle(app) == build_fab_from_disk(app)
    # A negated pattern can re-include a file below an ignored directory: still the same bytes.
    (app / ".gitignore").write_text("build/\n!build/out.py\n")
    assert build_bundle(app) == build_fab_from_disk(app)


def test_pinned_bundle_passes_and_one_changed_line_is_refused(tmp_path: Path) -> None:
    good = build_bundle(_app(tmp_path / "good"))
    evil = build_bundle(_app(tmp_path / "evil", client_line="app = None  # uploads records"))
    pin = _pin(good)
    assert check_bundle(good, sha256_hex(good), pin) == sha256_hex(good)
    with pytest.raises(AppNotTrustedError) as info:
        check_bundle(evil, sha256_hex(evil), pin)
    message = str(info.value)
    assert sha256_hex(evil) in message and "not pinned" in message
    assert sha256_hex(good) in message  # names what the node does run


def test_one_extra_file_changes_the_hash(tmp_path: Path) -> None:
    app = _app(tmp_path / "app")
    before = build_bundle(app)
    (app / "helper.py").write_text("import os\n")
    after = build_bundle(app)
    assert sha256_hex(before) != sha256_hex(after)
    with pytest.raises(AppNotTrustedError, match="not pinned"):
        check_bundle(after, "", _pin(before))


def test_the_run_cannot_vouch_for_a_bundle_by_naming_a_pinned_hash(tmp_path: Path) -> None:
    good = build_bundle(_app(tmp_path / "good"))
    evil = build_bundle(_app(tmp_path / "evil", client_line="import socket"))
    with pytest.raises(AppNotTrustedError, match="differs from the hash the run names"):
        check_bundle(evil, sha256_hex(good), _pin(good))


def test_a_pinned_hash_of_another_version_or_app_is_refused(tmp_path: Path) -> None:
    old = build_bundle(_app(tmp_path / "old", version="0.0.1"))
    with pytest.raises(AppNotTrustedError, match=r"fedsynth 0\.0\.1; this node runs only"):
        check_bundle(old, "", _pin(old))
    other = _app(tmp_path / "other")
    text = (other / "pyproject.toml").read_text().replace('name = "fedsynth"', 'name = "other"')
    (other / "pyproject.toml").write_text(text)
    bundle = build_bundle(other)
    with pytest.raises(AppNotTrustedError, match="app bundle is other"):
        check_bundle(bundle, "", _pin(bundle))


def test_malformed_and_oversized_bundles_are_refused() -> None:
    junk = b"not a zip"
    with pytest.raises(AppNotTrustedError, match=r"no readable pyproject\.toml"):
        check_bundle(junk, "", _pin(junk))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cli.py", "x = 1\n")
    nopyproject = buffer.getvalue()
    with pytest.raises(AppNotTrustedError, match=r"no readable pyproject\.toml"):
        check_bundle(nopyproject, "", _pin(nopyproject))
    big = b"0" * (app_pin.MAX_BUNDLE_BYTES + 1)
    with pytest.raises(AppNotTrustedError, match="above the"):
        check_bundle(big, "", _pin(big))


def test_trusted_app_values(tmp_path: Path) -> None:
    digest = "ab" * 32
    assert parse_trusted_app(digest.upper()) == digest
    assert parse_trusted_app(f"sha256:{digest}") == digest
    app = _app(tmp_path / "app")
    fab = tmp_path / "x.fab"
    fab.write_bytes(build_fab_from_disk(app))
    assert parse_trusted_app(str(fab)) == sha256_hex(fab.read_bytes())
    assert parse_trusted_app(str(app)) == sha256_hex(fab.read_bytes())
    with pytest.raises(ConfigError, match="'abc'"):
        parse_trusted_app("abc")


def test_pin_file_round_trip_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "trusted-app.toml"
    hashes = {"ab" * 32, "cd" * 32}
    write_pin_file(path, hashes)
    assert load_pin_file(path) == frozenset(hashes)
    with pytest.raises(ConfigError, match="not 64 lowercase hex"):
        write_pin_file(path, {"xyz"})
    for text, match in (
        ("fab_sha256 = []\n", "non-empty list"),
        ('fab_sha256 = ["abc"]\n', "'abc' is not 64"),
        (f'fab_sha256 = ["{"ab" * 32}"]\nallow_any = true\n', "unknown key 'allow_any'"),
        ("fab_sha256 = [", "not valid TOML"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_pin_file(path)


def test_pin_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_pin, "installed_version", lambda: VERSION)
    pin_file = tmp_path / "trusted-app.toml"
    # Nothing pinned and no source tree: refused, never "run anything".
    monkeypatch.setattr(app_pin, "installed_source_root", lambda: None)
    with pytest.raises(ConfigError, match="pass --trusted-app"):
        resolve_pin(pin_file)
    app = _app(tmp_path / "src")
    monkeypatch.setattr(app_pin, "installed_source_root", lambda: app)
    default = sha256_hex(build_fab_from_disk(app))
    assert resolve_pin(pin_file) == TrustedApp(frozenset({default}), VERSION)
    write_pin_file(pin_file, {"ab" * 32})
    assert resolve_pin(pin_file).fab_sha256 == {"ab" * 32}
    assert resolve_pin(pin_file, ["cd" * 32]).fab_sha256 == {"cd" * 32}


def test_symlinked_files_are_left_out_as_flwr_build_does_and_the_rest_kept(
    tmp_path: Path,
) -> None:
    app = _app(tmp_path / "app")
    (tmp_path / "outside.py").write_text("x = 0\n")
    os.symlink(app / "srv.py", app / "inside_link.py")
    os.symlink(tmp_path / "outside.py", app / "outside_link.py")
    names = [f"m{i:02d}.py" for i in range(20)]  # some are listed after a link
    for name in names:
        (app / name).write_text(f"# {name}\n")
    assert set(app_pin.collect_app_files(app)) == {"pyproject.toml", "srv.py", "cli.py", *names}
    assert build_bundle(app) == build_fab_from_disk(app)


def _zip_of(files: dict[str, bytes], *, size: int | None = None) -> bytes:
    """A stored (uncompressed) zip of ``files``, padded by one more entry to ``size`` bytes."""

    def build(pad: int) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
            if size is not None:
                archive.writestr("pad.bin", b"\0" * pad)
        return buffer.getvalue()

    if size is None:
        return build(0)
    content = build(size - len(build(0)))
    assert len(content) == size
    return content


def test_size_limits_include_their_bound(tmp_path: Path) -> None:
    project = f'[project]\nname = "fedsynth"\nversion = "{VERSION}"\n'.encode()
    # A bundle of exactly the limit passes the size check; one byte more is refused.
    at_limit = _zip_of({"pyproject.toml": project}, size=app_pin.MAX_BUNDLE_BYTES)
    assert check_bundle(at_limit, "", _pin(at_limit)) == sha256_hex(at_limit)
    # The pyproject.toml inside may be 1 MiB exactly, not more.
    mib = 1024 * 1024
    padded = project + b"#" * (mib - len(project) - 1) + b"\n"
    assert len(padded) == mib
    assert app_pin.bundle_metadata(_zip_of({"pyproject.toml": padded})) == ("fedsynth", VERSION)
    with pytest.raises(AppNotTrustedError, match=rf"^app bundle pyproject\.toml: {mib + 1} bytes"):
        app_pin.bundle_metadata(_zip_of({"pyproject.toml": padded + b"\n"}))
    with pytest.raises(AppNotTrustedError, match=r"^app bundle pyproject\.toml: no \[project\]"):
        app_pin.bundle_metadata(_zip_of({"pyproject.toml": b"[tool.x]\ny = 1\n"}))
    # A --trusted-app file of exactly the limit is hashed; one byte more is refused by name.
    fab = tmp_path / "limit.fab"
    fab.write_bytes(b"\0" * app_pin.MAX_BUNDLE_BYTES)
    assert parse_trusted_app(str(fab)) == sha256_hex(fab.read_bytes())
    fab.write_bytes(b"\0" * (app_pin.MAX_BUNDLE_BYTES + 1))
    with pytest.raises(ConfigError, match=r"bytes, above the \d+-byte limit of an app bundle$"):
        parse_trusted_app(str(fab))


def test_refusals_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nor a \.fab file, nor an app directory$"):
        parse_trusted_app(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=rf"^app bundle from {empty}: cannot build it \("):
        build_bundle(empty)
    with pytest.raises(ConfigError, match=rf"^pin file {empty}: cannot read \("):
        load_pin_file(empty)


def test_installed_source_tree_is_the_checkout() -> None:
    root = app_pin.installed_source_root()
    assert root is not None and (root / "client" / "app_pin.py").is_file()


def test_supernode_never_runs_flowers_own_runtime(tmp_path: Path) -> None:
    command = supernode_command(
        "flower-supernode",
        superlink="h:1",
        ca=tmp_path / "ca.pem",
        node_key=tmp_path / "node.key",
        config={"data-path": "/d"},
        superexec_secret=tmp_path / "superexec.secret",
    )
    assert command[command.index("--isolation") + 1] == "process"
    assert command[command.index("--host") + 1] == RUNTIME_HOST == "127.0.0.1"
    assert command[command.index("--superexec-auth-secret-file") + 1] == str(
        tmp_path / "superexec.secret"
    )
    assert "--trusted-entities" not in command
    wrapped = pinned_runtime.runtime_command(
        command,
        runtime_address="127.0.0.1:9094",
        fab_sha256=frozenset({"ab" * 32}),
        secret_file=tmp_path / "superexec.secret",
    )
    assert wrapped[wrapped.index("--") + 1 :] == command
    assert wrapped[wrapped.index("--fab-sha256") + 1] == "ab" * 32


def test_superexec_secret_is_private(tmp_path: Path) -> None:
    paths = NodePaths(tmp_path)
    path = ensure_superexec_secret(paths)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = path.read_bytes()
    assert len(secret) == 64
    assert ensure_superexec_secret(paths).read_bytes() == secret  # kept across starts
    path.chmod(0o644)
    with pytest.raises(IdentityError, match="mode 0644"):
        ensure_superexec_secret(paths)


class _Fakes:
    """Flower's runtime calls, recorded: what the task process pulled, pushed and ran."""

    def __init__(self, fab: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
        from flwr.app import Context, Message, RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        for field in ("_task_id", "_run_id", "_node_id"):  # as pull_task_input sets them
            monkeypatch.setattr(TaskIdentity, field, 1)
        self.message = Message(RecordDict(), dst_node_id=1, message_type="query.dataset_vector")
        self.message.metadata.__dict__["_message_id"] = "m1"
        self.context = Context(
            run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}
        )
        self.fab = SimpleNamespace(content=fab, hash_str=sha256_hex(fab))
        self.pushed: list[Any] = []
        self.outputs: list[str] = []
        self.ran: list[Any] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import flwr.supercore.heartbeat as heartbeat
        import flwr.supernode.runtime.run_clientapp as runner

        import fedsynth.client.flower_app as flower_app

        run = SimpleNamespace(run_id=1)
        monkeypatch.setattr(
            runner, "pull_task_input", lambda _c: (self.message, self.context, run, self.fab)
        )
        monkeypatch.setattr(runner, "push_message", lambda _c, m, _x: self.pushed.append(m))
        monkeypatch.setattr(
            runner,
            "push_task_output",
            lambda **kw: self.outputs.append(kw["sub_status"]),
        )

        def never(*_a: object, **_k: object) -> None:
            raise AssertionError("the bundle was installed")

        monkeypatch.setattr(runner, "install_from_fab", never)
        monkeypatch.setattr(
            heartbeat,
            "HeartbeatSender",
            lambda _fn: SimpleNamespace(start=lambda: None, stop=lambda: None),
        )
        monkeypatch.setattr(
            pinned_runtime, "_client", lambda *_a: SimpleNamespace(close=lambda: None)
        )

        def installed_app(message: Any, context: Any) -> Any:
            self.ran.append(message)
            return self.message

        monkeypatch.setattr(flower_app, "app", installed_app)


def test_task_with_unpinned_bundle_is_refused_without_running_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = build_bundle(_app(tmp_path / "good"))
    evil = build_bundle(_app(tmp_path / "evil", client_line="app = 1"))
    fakes = _Fakes(evil, monkeypatch)
    fakes.install(monkeypatch)
    assert pinned_runtime.run_task("127.0.0.1:1", "t", _pin(good)) == 2
    assert fakes.ran == []
    [reply] = fakes.pushed
    assert reply.has_error() and reply.error.reason == "policy"
    assert fakes.outputs == ["failed"]


def test_task_with_pinned_bundle_runs_the_installed_client_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = build_bundle(_app(tmp_path / "good"))
    fakes = _Fakes(good, monkeypatch)
    fakes.install(monkeypatch)
    assert pinned_runtime.run_task("127.0.0.1:1", "t", _pin(good)) == 0
    assert fakes.ran == [fakes.message]
    assert fakes.pushed == [fakes.message]
    assert fakes.outputs == ["completed"]


def test_node_init_pins_and_status_shows_the_pin(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedsynth.client.node_cli import node_app

    runner = CliRunner()
    bad = runner.invoke(node_app, ["init", str(tmp_path / "bad"), "--trusted-app", "abc"])
    assert bad.exit_code == 2 and "'abc'" in bad.output
    assert not (tmp_path / "bad").exists()  # nothing half-created
    digest = "ab" * 32
    node = tmp_path / "node"
    result = runner.invoke(node_app, ["init", str(node), "--trusted-app", digest])
    assert result.exit_code == 0, result.output
    assert load_pin_file(node / "trusted-app.toml") == {digest}
    status = runner.invoke(node_app, ["status", str(node)])
    assert status.exit_code == 0, status.output
    assert f"sha256 {digest}" in status.output and "trusted-app.toml" in status.output
    # Without a pin file, status shows the hash of the bundle built from the installed source.
    (node / "trusted-app.toml").unlink()
    status = runner.invoke(node_app, ["status", str(node)])
    root = app_pin.installed_source_root()
    assert root is not None
    assert "built from the installed fedsynth's source" in status.output
    assert "sha256 " in status.output and "flwr build" in status.output
