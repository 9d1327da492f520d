"""The coordinator's Synthesis service wiring: its files, command line, and the start supervisor.

Also ``flwr run`` outcome parsing: a run whose ServerApp raised must never read as a release.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from cryptography import x509

from fedsynth.protocol.errors import CertificateError, ConfigError
from fedsynth.server import coordinator_cli
from fedsynth.server.consortium import CoordinatorPaths
from fedsynth.server.consortium import init as init_consortium
from fedsynth.server.flwr_runs import FlwrRun, run_id_from_line, run_streaming, status_from_ls
from fedsynth.server.pki import check_server_certificate
from fedsynth.server.synthesis_client import read_token_file
from fedsynth.server.synthesis_process import (
    SynthesisFiles,
    check_synthesis_files,
    exit_report,
    init_synthesis,
    last_line,
    synthesis_command,
)


@pytest.fixture
def coord(tmp_path: Path) -> CoordinatorPaths:
    paths = init_consortium(tmp_path / "coord", ["localhost", "127.0.0.1"])
    init_synthesis(paths.directory, ca_cert=paths.ca_cert, ca_key=paths.ca_key)
    return paths


def test_init_issues_a_ca_signed_certificate_and_a_private_token(coord: CoordinatorPaths) -> None:
    files = SynthesisFiles(coord.directory)
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(coord.ca_cert.read_bytes())
    check_server_certificate(cert, ca, hosts=["127.0.0.1", "localhost"])  # raises if not
    assert (
        cert.public_key()
        != x509.load_pem_x509_certificate(coord.server_cert.read_bytes()).public_key()
    )  # its own key, not the SuperLink's
    for private in (files.key, files.token):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    (token,) = read_token_file(files.token)
    assert len(token) >= 40
    assert files.releases.is_dir()
    check_synthesis_files(files, ca_cert=coord.ca_cert, host="127.0.0.1")


def test_init_never_overwrites_and_tokens_differ(tmp_path: Path, coord: CoordinatorPaths) -> None:
    before = SynthesisFiles(coord.directory).token.read_bytes()
    with pytest.raises(CertificateError, match=r"synthesis\.pem already exists"):
        init_synthesis(coord.directory, ca_cert=coord.ca_cert, ca_key=coord.ca_key)
    assert SynthesisFiles(coord.directory).token.read_bytes() == before
    other = init_consortium(tmp_path / "other")
    init_synthesis(other.directory, ca_cert=other.ca_cert, ca_key=other.ca_key)
    assert SynthesisFiles(other.directory).token.read_bytes() != before


def test_start_checks_refuse_a_host_the_certificate_does_not_name(coord: CoordinatorPaths) -> None:
    files = SynthesisFiles(coord.directory)
    with pytest.raises(CertificateError, match=r"synthesis\.pem"):
        check_synthesis_files(files, ca_cert=coord.ca_cert, host="10.1.2.3")


def test_start_checks_refuse_a_token_file_others_can_read(coord: CoordinatorPaths) -> None:
    files = SynthesisFiles(coord.directory)
    os.chmod(files.token, 0o644)
    with pytest.raises(ConfigError, match="0644"):
        check_synthesis_files(files, ca_cert=coord.ca_cert, host="127.0.0.1")


def test_start_checks_name_missing_files(tmp_path: Path) -> None:
    paths = init_consortium(tmp_path / "old")  # a directory from before the service existed
    with pytest.raises(CertificateError, match="--no-synthesis"):
        check_synthesis_files(SynthesisFiles(paths.directory), ca_cert=paths.ca_cert, host="x")


def test_command_always_serves_tls_with_the_token_file(coord: CoordinatorPaths) -> None:
    files = SynthesisFiles(coord.directory)
    command = synthesis_command(
        files, releases=Path("rel"), model="tiny-llama", host="0.0.0.0", port=5
    )
    assert command[:4] == [sys.executable, "-m", "fedsynth.server.synthesis_process", "serve"]
    assert "--insecure" not in command
    flags = dict(zip(command[4::2], command[5::2], strict=True))
    assert flags["--tls-cert"] == str(files.cert.absolute())
    assert flags["--tls-key"] == str(files.key.absolute())
    assert flags["--token-file"] == str(files.token.absolute())
    assert flags["--releases"] == str(Path("rel").absolute())
    assert (flags["--model"], flags["--host"], flags["--port"]) == ("tiny-llama", "0.0.0.0", "5")


def test_exit_report_is_one_line_naming_both_processes() -> None:
    log = "loading\n\nerror: model='x': not a packaged model\n\n"
    line = exit_report("Synthesis service", 2, Path("s.log"), log, stopped="SuperLink")
    assert "\n" not in line
    assert line.startswith("the Synthesis service exited with status 2")
    assert "not a packaged model" in line and "stopped the SuperLink too" in line
    assert len(last_line("x" * 1000)) == 300
    assert last_line("\n \n") == ""


class _Proc:
    def __init__(self, code: int | None) -> None:
        self.code = code

    def poll(self) -> int | None:
        return self.code


class _Service:
    def __init__(self, code: int | None, log: Path) -> None:
        self.process = _Proc(code)
        self.log_path = log
        self.host, self.port = "127.0.0.1", 1
        self.stopped = False

    def ready(self) -> bool:
        return False

    def stop(self) -> None:
        self.stopped = True


@pytest.mark.parametrize("crashed", ["superlink", "synthesis"])
def test_a_crash_of_either_process_stops_the_other(
    tmp_path: Path, crashed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    link_log, service_log = tmp_path / "superlink.log", tmp_path / "synthesis.log"
    link_log.write_text("ERROR: address already in use\n")
    service_log.write_text("error: model='m': not a packaged model\n")
    link = _Service(1 if crashed == "superlink" else None, link_log)
    service = _Service(2 if crashed == "synthesis" else None, service_log)
    with pytest.raises(typer.Exit):
        coordinator_cli._supervise(link, service)  # type: ignore[arg-type]
    err = " ".join(capsys.readouterr().err.split())
    if crashed == "superlink":
        assert service.stopped
        assert "the SuperLink exited with status 1 (ERROR: address already in use)" in err
        assert "stopped the Synthesis service too" in err
    else:
        assert link.stopped
        assert "the Synthesis service exited with status 2" in err
        assert "not a packaged model" in err and "stopped the SuperLink too" in err


def _ls_json(run_id: int, status: str) -> str:
    runs: list[dict[str, Any]] = [{"run-id": str(run_id), "status": status, "status-details": "x"}]
    return "banner\n" + json.dumps({"success": True, "runs": runs})


def test_flwr_run_output_parsing() -> None:
    assert run_id_from_line("Successfully started run 6632580376489076747\n") == (
        6632580376489076747
    )
    assert run_id_from_line("Using SuperLink: fedsynth") is None
    assert status_from_ls(_ls_json(7, "finished:failed"), 7) == ("finished:failed", "x")
    assert status_from_ls(_ls_json(7, "finished:completed"), 8) is None
    assert status_from_ls("not json {", 7) is None
    assert FlwrRun(0, 7, "finished:completed", "").completed
    assert not FlwrRun(0, 7, "finished:failed", "boom").completed  # flwr run said 0
    assert not FlwrRun(0, None, "", "").completed
    assert not FlwrRun(1, 7, "finished:completed", "").completed


@pytest.mark.parametrize("status", ["finished:failed", "finished:completed"])
def test_a_streamed_run_is_judged_by_its_final_status(tmp_path: Path, status: str) -> None:
    fake = tmp_path / "flwr"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "ls" ]; then\n'
        f"  echo '{_ls_json(42, status).splitlines()[1]}'\n"
        "else\n"
        "  echo 'Successfully started run 42'\n"
        "  echo 'ERROR : ServerApp raised an exception'\n"
        "fi\n"
        "exit 0\n"
    )
    fake.chmod(0o755)
    out = tmp_path / "out.txt"
    with out.open("w") as handle:
        run = run_streaming([str(fake), "run"], flwr=str(fake), federation="f", out=handle)
    assert (run.returncode, run.run_id, run.status) == (0, 42, status)
    assert run.completed is (status == "finished:completed")
    assert "ServerApp raised" in out.read_text()
