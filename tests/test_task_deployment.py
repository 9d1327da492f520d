"""A whole task across a real TLS federation, pulled through Synthesis; SuperNodes killed mid-round.

Everything runs as real processes on 127.0.0.1, set up with fedsynth's own commands as an
operator and three holders would: ``coordinator init``, ``node init`` and ``add-node`` (in
process), then ``coordinator start`` (SuperLink with TLS and node authentication, plus the
Synthesis service), three ``node start`` (each with its own data, POLICY.toml and budget store),
``task run TASK.toml`` and ``pull`` as subprocesses. The tiny shape-only model keeps the
compute small; what costs time is Flower's process model (a fresh ClientApp process per holder
and stage) and one stage deadline for each round with a killed holder.

The federation is started once for the module; the tests run in file order:

1. a whole task: a ledger row, every holder charged once, the release streamed by ``pull``;
2. one SuperNode SIGKILLed once the key exchange is done (when the coordinator starts the
   masked-input stage): the round completes with t = 2 of 3, the report names the dropped
   node, the two survivors are charged once and the killed holder nothing (a holder charges
   its budget only when its masked input leaves, and this one's never did: the test holds
   the victim's budget store's write lock from the key exchange until the kill, so that
   does not rest on timing);
3. two of three killed the same way: the round aborts below t. No ledger row and no release
   file; the killed holders are charged nothing. The one holder whose masked input left is
   charged exactly once: sending it is the point of no return (the coordinator now holds a
   masked input it could unmask if it had the killed holders' shares), so the design charges
   then and never undoes a charge on the coordinator's word that the round failed;
4. the coordinator's machine "crashes" (``coordinator start``, its SuperLink, SuperExec,
   ServerApp and Synthesis service all SIGKILLed) once every holder's masked input has left:
   no ledger row and no release; restarted on the same state directory and ports, the
   SuperLink's saved state keeps every node id and the holders' nodes reconnect by themselves;
   the operator's rerun of the same task is refused by every holder (each already charged it
   once) and aborts: nobody is charged twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from processes import add_holder, cli_ok, free_port, start_coordinator, wait_nodes_online

from fedsynth.client.budget import ClientBudget
from fedsynth.protocol.deployment import die_with_parent, stop_process
from fedsynth.server.coordinator_cli import coordinator_app
from fedsynth.server.ledger import file_digest, ledger_rows
from fedsynth.server.release import load_release

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HOLDERS = ("alice", "bob", "carol")
EPSILON = 2.0
STAGE_S = 90  # each stage starts a fresh ClientApp per holder; a killed one costs a deadline
CLI = [sys.executable, "-m", "fedsynth.simulations"]
POSITIVE = (
    "a warm and funny film",
    "the cast is wonderful",
    "a moving, generous story",
    "bright, clever and kind",
)
NEGATIVE = (
    "a dull and noisy mess",
    "the plot goes nowhere",
    "two hours of tedium",
    "flat, cold and far too long",
)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(
            [*CLI, *args],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),  # a killed test run leaves nothing running
        )


def _wait_for(log: Path, text: str, timeout: float, *procs: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        for proc in procs:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)


@dataclass
class Federation:
    root: Path
    coord: Path
    superlink: str
    synthesis: str
    node_ids: dict[str, int]
    coordinator: subprocess.Popen[bytes]
    nodes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    budgets: dict[str, Path] = field(default_factory=dict)

    @property
    def releases(self) -> Path:
        return self.coord / "releases"

    @property
    def app(self) -> Path:
        """The app release the operator runs and every holder pins (frozen for the module)."""
        return self.root / "app"

    def node_log(self, name: str) -> Path:
        return self.root / f"node-{name}.log"

    def start_node(self, name: str) -> None:
        directory = self.root / name
        self.nodes[name] = _spawn(
            [
                "node",
                "start",
                str(directory),
                "--data",
                str(directory / "data.jsonl"),
                "--policy",
                str(directory / "POLICY.toml"),
                "--superlink",
                self.superlink,
                "--ca",
                str(self.coord / "ca.pem"),
                "--port",
                str(free_port()),
                "--model",
                "tiny-llama",
                "--trusted-app",
                str(self.app),
            ],
            self.node_log(name),
            _env(),
        )

    def wait_online(self, names: tuple[str, ...], seen: int, timeout: float = 90) -> None:
        """Wait until the SuperLink has activated each node ``seen`` times in all."""
        log = self.coord / "superlink.log"
        deadline = time.monotonic() + timeout
        for name in names:
            marker = f"Activated node_id={self.node_ids[name]}"
            while log.read_text(errors="replace").count(marker) < seen:
                assert self.nodes[name].poll() is None, self.node_log(name).read_text()[-3000:]
                assert time.monotonic() < deadline, self.node_log(name).read_text()[-3000:]
                time.sleep(0.3)

    def read_node_ids(self) -> None:
        """The node id each holder got at the coordinator's latest start (its log says)."""
        lines = (self.root / "coordinator.log").read_text().splitlines()
        for name in HOLDERS:
            line = [ln for ln in lines if f"registered {name}:" in ln][-1]
            self.node_ids[name] = int(line.rsplit("node id", 1)[1])

    def kill_node(self, name: str) -> None:
        """SIGKILL the holder's SuperNode and its ClientApp (no goodbye to the SuperLink)."""
        cli = self.nodes[name]
        for child in psutil.Process(cli.pid).children():
            os.killpg(os.getpgid(child.pid), signal.SIGKILL)
        cli.wait(timeout=30)

    def task_file(self, task_id: str) -> Path:
        path = self.root / f"{task_id}.toml"
        labels = "".join(
            f'[[labels]]\nname = "{name}"\ninstruction = "A {name} review:\\n"\n'
            f'shots = ["{shot}"]\n\n'
            for name, shot in (("positive", "lovely"), ("negative", "awful"))
        )
        path.write_text(
            f'method = "vector"\ntask_id = "{task_id}"\n\n'
            '[model]\nname = "tiny-llama"\nlayers = [1, 2]\nmax_text_tokens = 24\n'
            "prior_per_label = 3\nmax_new_tokens = 6\ngeneration_batch = 4\n\n"
            f'[privacy]\nepsilon = {EPSILON}\ndelta = 1e-5\nmode = "distributed"\n\n'
            "[federation]\nexpected_holders = 3\nmin_holders = 3\nthreshold = 2\n\n"
            f"[deadlines]\nstage_s = {STAGE_S}\nholders_s = 60\n\n"
            f'[store]\ndir = "{self.releases}"\n\n{labels}'
        )
        return path

    def run_task(self, task_id: str) -> subprocess.Popen[bytes]:
        return _spawn(
            [
                "task",
                "run",
                str(self.task_file(task_id)),
                "--federation",
                "fedsynth",
                "--app",
                str(self.app),
            ],
            self.root / f"task-{task_id}.log",
            _env(FLWR_HOME=str(self.coord / "flwr-home")),
        )

    def charges(self, name: str) -> list[tuple[str, str]]:
        path = self.budgets[name]
        if not path.exists():
            return []
        return [(row["task_id"], row["epsilon"]) for row in ClientBudget(path).entries()]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("deployment")
    # The operator runs one app release and the holders pin exactly its bundle hash; a copy
    # keeps edits to the working tree during the run from changing the bundle between the two.
    (root / "app").mkdir()
    (root / "app" / "pyproject.toml").write_bytes((REPO / "pyproject.toml").read_bytes())
    coord = root / "coord"
    cli_ok(coordinator_app, "init", str(coord))
    token = coord / "synthesis.token"
    assert token.stat().st_mode & 0o777 == 0o600
    budgets: dict[str, Path] = {}
    for i, name in enumerate(HOLDERS):
        directory = root / name
        add_holder(coord, directory, name)
        rows = [(text, "positive") for text in POSITIVE] + [(t, "negative") for t in NEGATIVE]
        (directory / "data.jsonl").write_text(
            "".join(
                json.dumps({"text": f"{text} ({name} {k})", "label": label}) + "\n"
                for k, (text, label) in enumerate(rows[i:] + rows[:i])
            )
        )
        budgets[name] = directory / "budget.sqlite"
        (directory / "POLICY.toml").write_text(
            "max_epsilon_per_task = 4.0\nmax_total_epsilon = 10.0\n"
            'allowed_modes = ["distributed"]\nbudget_path = "budget.sqlite"\n'
        )
    for name in HOLDERS:  # the operator sends the final roster to every holder
        (root / name / "roster.json").write_bytes((coord / "roster.json").read_bytes())

    link_port, synthesis_port = free_port(), free_port()
    coord_log = root / "coordinator.log"
    coordinator = start_coordinator(coord, link_port, synthesis_port, coord_log, env=_env())
    fed = Federation(
        root=root,
        coord=coord,
        superlink=f"127.0.0.1:{link_port}",
        synthesis=f"127.0.0.1:{synthesis_port}",
        node_ids={},
        coordinator=coordinator,
        budgets=budgets,
    )
    try:
        _wait_for(coord_log, "Ctrl-C stops both", 120, coordinator)
        fed.read_node_ids()
        for name in HOLDERS:
            fed.start_node(name)
        fed.wait_online(HOLDERS, 1)
        _wait_for(coord_log, "Synthesis service ready", 120, coordinator)
        yield fed
    finally:
        for proc in fed.nodes.values():
            stop_process(proc)
        stop_process(fed.coordinator)  # the latest one: a test may have restarted it
        # SIGTERM to `coordinator start` stops the SuperLink and the Synthesis service with it.
        log = coord_log.read_text(errors="replace")
        assert "stopping the SuperLink and the Synthesis service" in log, log[-3000:]
        assert not _listening(fed.synthesis), "the Synthesis service outlived the coordinator"
        assert not _listening(fed.superlink), "the SuperLink outlived the coordinator"


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def test_whole_task_over_tls_then_pulled_through_synthesis(federation: Federation) -> None:
    fed = federation
    task = fed.run_task("deploy-full")
    assert task.wait(timeout=900) == 0, (fed.root / "task-deploy-full.log").read_text()[-4000:]

    rows = ledger_rows(fed.releases)
    assert [(r["task_id"], r["epsilon"], r["survivors"]) for r in rows] == [
        ("deploy-full", str(EPSILON), 3)
    ]
    release_file = fed.releases / "deploy-full.safetensors"
    release = load_release(release_file)
    assert rows[0]["digest"] == file_digest(release_file)  # the row names the published bytes
    assert release.report["dropped_clients"] == []
    for name in HOLDERS:  # each holder's own store: charged once, with the task's epsilon
        assert fed.charges(name) == [("deploy-full", str(EPSILON))]

    out = fed.root / "pulled.jsonl"
    proc = subprocess.run(
        [
            *CLI,
            "pull",
            "--release",
            "deploy-full",
            "--n",
            "6",
            "--out",
            str(out),
            "--server",
            fed.synthesis,
            "--token-file",
            str(fed.coord / "synthesis.token"),
            "--ca",
            str(fed.coord / "ca.pem"),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(samples) == 6
    assert {s["release_id"] for s in samples} == {"deploy-full"}
    assert sorted(s["label"] for s in samples) == ["negative"] * 3 + ["positive"] * 3
    assert all(isinstance(s["text"], str) and s["text"] for s in samples)
    # Generating is post-processing: the ledger and the budgets are unchanged.
    assert len(ledger_rows(fed.releases)) == 1
    assert all(fed.charges(name) == [("deploy-full", str(EPSILON))] for name in HOLDERS)


@contextlib.contextmanager
def _budget_held(paths: list[Path]) -> Iterator[None]:
    """Hold each store's write lock: its holder can read it but cannot charge until release.

    The stores are SQLite in WAL mode, so the holder's checks (reads) go on; only a charge
    (``BEGIN IMMEDIATE``) waits, up to the store's busy timeout.
    """
    held = []
    try:
        for path in paths:
            db = sqlite3.connect(path, isolation_level=None)
            held.append(db)
            db.execute("BEGIN IMMEDIATE")
        yield
    finally:
        for db in held:
            if db.in_transaction:
                db.execute("ROLLBACK")
            db.close()


def _wait_log(log: Path, text: str, task: subprocess.Popen[bytes], deadline: float) -> None:
    while text not in log.read_text(errors="replace"):
        assert task.poll() is None, log.read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
        time.sleep(0.05)


def _kill_at_masked_input(fed: Federation, names: tuple[str, ...], task_id: str) -> str:
    """Run ``task_id``; SIGKILL ``names`` when the coordinator starts the masked-input stage.

    Deterministic, not a race: once the key exchange starts (every holder has passed setup),
    the test holds the victims' budget stores' write locks, so a victim cannot charge, and a
    masked input leaves only after its charge. The coordinator starts the masked-input stage
    only once every share_keys reply is in, so each victim is then alive, past the key
    exchange, and has sent nothing that costs privacy. A charge at setup or at share_keys
    (too early) would show: one committed before the lock, or one blocked on it makes the
    victim miss the key exchange, and the caller checks it was dropped at masked_input.
    Returns the task's log.
    """
    log = fed.root / f"task-{task_id}.log"
    task = fed.run_task(task_id)
    deadline = time.monotonic() + 600
    _wait_log(log, "secure sum: stage share_keys", task, deadline)
    with _budget_held([fed.budgets[name] for name in names]):
        _wait_log(log, "secure sum: stage masked_input", task, deadline)
        for name in names:
            fed.kill_node(name)
    task.wait(timeout=900)
    return log.read_text(errors="replace")


def _dropped_at(log: str, node_id: int) -> list[str]:
    """The stages at which the coordinator's log says ``node_id`` dropped out."""
    marker = f"node {node_id} dropped at "
    lines = [line for line in log.splitlines() if marker in line]
    return [line.split(marker, 1)[1].split(":", 1)[0] for line in lines]


def test_supernode_killed_mid_round_survivors_complete(federation: Federation) -> None:
    fed = federation
    victim = "carol"
    log = _kill_at_masked_input(fed, (victim,), "deploy-drop")
    assert "release and ledger row in" in log, log[-4000:]
    # The victim took part in the key exchange: it was lost at masked_input, not before.
    assert not {"setup", "share_keys"} & set(_dropped_at(log, fed.node_ids[victim])), log[-4000:]

    rows = {r["task_id"]: r for r in ledger_rows(fed.releases)}
    assert set(rows) == {"deploy-full", "deploy-drop"}
    assert rows["deploy-drop"]["survivors"] == 2
    report = load_release(fed.releases / "deploy-drop.safetensors").report
    assert report["survivors"] == 2
    assert report["dropped_clients"] == [str(fed.node_ids[victim])]
    for name in ("alice", "bob"):
        assert fed.charges(name) == [
            ("deploy-full", str(EPSILON)),
            ("deploy-drop", str(EPSILON)),
        ]
    assert fed.charges(victim) == [("deploy-full", str(EPSILON))]


def test_two_of_three_killed_round_aborts_without_release(federation: Federation) -> None:
    fed = federation
    fed.start_node("carol")  # the holder killed above comes back
    fed.wait_online(("carol",), 2)
    killed = ("bob", "carol")
    log = _kill_at_masked_input(fed, killed, "deploy-abort")

    assert "the round is aborted and nothing is released" in log, log[-4000:]
    assert "ended finished:failed" in log, log[-4000:]  # `task run` reports the failed run
    for name in killed:
        assert not {"setup", "share_keys"} & set(_dropped_at(log, fed.node_ids[name])), log
    assert {r["task_id"] for r in ledger_rows(fed.releases)} == {"deploy-full", "deploy-drop"}
    assert not list(fed.releases.glob("deploy-abort*"))
    for name in killed:
        assert all(task_id != "deploy-abort" for task_id, _ in fed.charges(name))
    # alice's masked input left before the round aborted: charged once, by her own store.
    assert fed.charges("alice")[-1] == ("deploy-abort", str(EPSILON))
    assert [t for t, _ in fed.charges("alice")].count("deploy-abort") == 1


def test_coordinator_crash_mid_task_then_restart_never_charges_twice(
    federation: Federation,
) -> None:
    fed = federation
    for name in ("bob", "carol"):  # the holders killed above come back
        fed.start_node(name)
    fed.wait_online(("bob",), 2)
    fed.wait_online(("carol",), 3)
    task = fed.run_task("deploy-crash")
    deadline = time.monotonic() + 600
    while not all(("deploy-crash", str(EPSILON)) in fed.charges(n) for n in HOLDERS):
        assert task.poll() is None, (fed.root / "task-deploy-crash.log").read_text()[-4000:]
        assert time.monotonic() < deadline, (fed.root / "task-deploy-crash.log").read_text()
        time.sleep(0.1)
    # Every masked input has left: the coordinator's machine goes down at once.
    start = psutil.Process(fed.coordinator.pid)
    machine = [start, *start.children(recursive=True)]
    assert len(machine) >= 3  # coordinator start, the SuperLink, the Synthesis service, ...
    for proc in machine:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(machine, timeout=30)
    fed.coordinator.wait(timeout=30)
    assert task.wait(timeout=300) != 0  # the operator's `task run` sees its run fail
    assert "deploy-crash" not in {r["task_id"] for r in ledger_rows(fed.releases)}
    assert not list(fed.releases.glob("deploy-crash*.safetensors"))

    # Restarted on the same state directory and ports; the holders reconnect by themselves.
    link_port = int(fed.superlink.rsplit(":", 1)[1])
    synthesis_port = int(fed.synthesis.rsplit(":", 1)[1])
    log = fed.root / "coordinator.log"
    fed.coordinator = start_coordinator(fed.coord, link_port, synthesis_port, log, env=_env())
    deadline = time.monotonic() + 180
    while log.read_text(errors="replace").count("Synthesis service ready") < 2:
        assert fed.coordinator.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.3)
    before = dict(fed.node_ids)
    fed.read_node_ids()
    assert fed.node_ids == before  # the SuperLink's state survived the crash
    # No holder restarts anything: each SuperNode reconnects by itself.
    wait_nodes_online(
        fed.coord,
        list(fed.node_ids.values()),
        list(fed.nodes.values()),
        fed.root / "coordinator.log",
    )

    # The operator reruns the task: every holder already contributed to it and refuses.
    rerun = fed.run_task("deploy-crash")
    assert rerun.wait(timeout=600) != 0
    text = (fed.root / "task-deploy-crash.log").read_text(errors="replace")
    assert "the round is aborted and nothing is released" in text, text[-4000:]
    assert "deploy-crash" not in {r["task_id"] for r in ledger_rows(fed.releases)}
    for name in HOLDERS:
        assert [t for t, _ in fed.charges(name)].count("deploy-crash") == 1, name
