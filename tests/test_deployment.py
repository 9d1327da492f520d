"""Deployment: a real SuperLink and three SuperNodes on loopback, the app started by `flwr run`.

The processes are Flower's own (`flower-superlink`, `flower-supernode`, `flwr run`), each holder
gets its data file through `--node-config`, and a shape-only tiny model keeps the run short.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import free_port

from fedsynth.client.budget import ClientBudget
from fedsynth.protocol.deployment import die_with_parent
from fedsynth.protocol.identity import (
    ROSTER_FILE,
    simulated_identity_path,
    write_simulated_consortium,
)
from fedsynth.simulations.demo import demo_config, prepare_data

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture
def flower_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = dict(os.environ)
    # The SuperLink starts helper executables (flower-superexec) by name: the venv must be on
    # PATH even when the tests run as `.venv/bin/python -m pytest` without activation.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        FLWR_HOME=str(tmp_path / "flwr-home"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    yield env


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=REPO,
        preexec_fn=die_with_parent(),  # a killed test run leaves nothing running
    )


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_flwr_run_on_real_superlink_and_supernodes(
    tmp_path: Path, flower_env: dict[str, str]
) -> None:
    superlink = shutil.which("flower-superlink", path=str(Path(sys.executable).parent))
    supernode = shutil.which("flower-supernode", path=str(Path(sys.executable).parent))
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent))
    assert superlink and supernode and flwr
    out = tmp_path / "run"
    config = demo_config("quick", out_dir=out, clients=3, model="tiny-llama", layers=(1, 2))
    data = prepare_data(config)  # the holders' own files; the coordinator never reads them
    # Each holder's signing key and the roster they all pin (generated out of band).
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    write_simulated_consortium(keys, 3)
    link_port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            _start(
                [
                    superlink,
                    "--insecure",
                    "--disable-runtime-dependency-installation",
                    "--port",
                    str(link_port),
                ],
                flower_env,
                tmp_path / "superlink.log",
            )
        )
        _wait_port(link_port)
        for i in range(3):
            node_config = (
                f'data-path="{data.partition_dir / f"partition-{i}.jsonl"}" '
                f'budget-path="{tmp_path / f"budget-{i}.sqlite"}" '
                f'identity-path="{simulated_identity_path(keys, i)}" '
                f'roster-path="{keys / ROSTER_FILE}" '
                'model="tiny-llama" embedder="hashing-64"'
            )
            procs.append(
                _start(
                    [
                        supernode,
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{link_port}",
                        "--port",
                        str(free_port()),
                        "--node-config",
                        node_config,
                    ],
                    flower_env,
                    tmp_path / f"supernode-{i}.log",
                )
            )
        home = Path(flower_env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "test"\n\n'
            f'[superlink.test]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
        )
        run_config = f'model="tiny-llama" layers="1,2" out-dir="{out}" preset="quick"'
        proc = subprocess.run(
            [flwr, "run", ".", "test", "--stream", "--run-config", run_config],
            env=flower_env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        logs = proc.stdout[-3000:] + proc.stderr[-3000:]
        assert proc.returncode == 0, logs
        deadline = time.monotonic() + 120
        while not (out / "summary.json").exists() and time.monotonic() < deadline:
            time.sleep(2)
        assert (out / "summary.json").exists(), logs
        report = json.loads((out / "privacy_report.json").read_text())
        assert report["K"] == 3 and report["survivors"] == 3
        assert report["trust_mode"] == "distributed"
        scores = json.loads((out / "summary.json").read_text())["scores"]
        # The coordinator also asked for the non-private ceiling (epsilon = inf); no holder's
        # own node config consents to it, so every holder refused it and it was never made.
        assert set(scores) == {"prior (eps=0)", "eps=4"}
        assert not (out / "release-epsinf.safetensors").exists()
        assert "release-epsinf not made: the holders refused it" in proc.stdout + proc.stderr
        for row in scores.values():
            assert {"label_fidelity", "tstr_accuracy", "tstr_macro_f1", "embedding_fd"} <= set(row)
        rows = (out / "synthetic.jsonl").read_text().splitlines()
        assert len(rows) == 2 * config.synthetic_per_label
        for i in range(3):  # every holder charged its own budget for the private release only
            charged = ClientBudget(tmp_path / f"budget-{i}.sqlite").entries()
            assert [row["epsilon"] for row in charged] == ["4.0"]

        # The same deployment runs federated PE (weightless hashing embedder, tiny generator).
        pe_out = tmp_path / "pe-run"
        pe_config = (
            f'method="pe" model="tiny-llama" embedder="hashing-64" out-dir="{pe_out}" '
            'preset="quick" pe-rounds=2 pe-population=8'
        )
        proc = subprocess.run(
            [flwr, "run", ".", "test", "--stream", "--run-config", pe_config],
            env=flower_env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        logs = proc.stdout[-3000:] + proc.stderr[-3000:]
        assert proc.returncode == 0, logs
        deadline = time.monotonic() + 120
        while not (pe_out / "summary.json").exists() and time.monotonic() < deadline:
            time.sleep(2)
        assert (pe_out / "summary.json").exists(), logs
        report = json.loads((pe_out / "privacy_report.json").read_text())
        assert report["rounds_completed"] == 2 and report["K"] == 3
        assert [h["survivors"] for h in report["history"]] == [3, 3]
        assert len((pe_out / "synthetic.jsonl").read_text().splitlines()) == 2 * 8
        for i in range(3):  # the PE task charged once (its whole epsilon) + one row per round
            rows = ClientBudget(tmp_path / f"budget-{i}.sqlite").entries()
            pe_rows = [r for r in rows if r["task_id"] == report["task_id"]]
            assert len(pe_rows) == 3 and sum(float(r["epsilon"]) for r in pe_rows) == 4.0
    finally:
        _stop(procs)
