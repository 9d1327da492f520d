#!/usr/bin/env python
"""Regenerate the Python wire code under protocol/wire/ from the .proto files under proto/.

Usage: ``python scripts/gen_proto.py [--out DIR]`` (default: protocol/wire, the committed code).

Runs ``python -m grpc_tools.protoc`` (messages, .pyi stubs for mypy, gRPC stubs) into a
temporary directory, then writes each module flat into the ``fedsynth.protocol.wire`` package:
protoc names a module after its .proto path (``fedsynth.synthesis.v1.synthesis_pb2``), which is
not where it is installed, so the generated imports and module names are rewritten to their
``fedsynth.protocol.wire.*`` names. The output depends only on the .proto files and the
grpcio-tools version (pinned in the dev extra), so a test can check that the committed code is
up to date by regenerating it into a temporary directory and comparing bytes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "protocol" / "wire"
PACKAGE = "fedsynth.protocol.wire"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
INIT = '''"""Generated protobuf and gRPC code for the wire schemas in proto/ (do not edit).

Regenerate with ``python scripts/gen_proto.py``; a test checks that these files are up to date.
"""
'''


def proto_files(root: Path = PROTO_ROOT) -> list[Path]:
    """Every .proto file under ``root``, relative to it, in a stable order."""
    return sorted(p.relative_to(root) for p in root.rglob("*.proto"))


def _module_renames(protos: list[Path]) -> dict[str, str]:
    """Map protoc's module name of each generated file to its name inside ``PACKAGE``."""
    renames: dict[str, str] = {}
    flat: dict[str, Path] = {}
    for proto in protos:
        stem = proto.stem + "_pb2"
        if stem in flat:
            raise SystemExit(f"{proto} and {flat[stem]} would both generate {PACKAGE}.{stem}")
        flat[stem] = proto
        dotted = ".".join((*proto.parent.parts, stem))
        renames[dotted] = f"{PACKAGE}.{stem}"
    return renames


def _rewrite(text: str, renames: dict[str, str]) -> str:
    """Point protoc's imports and registered module names at the installed package."""
    for old, new in renames.items():
        old_pkg, _, name = old.rpartition(".")
        new_pkg = new.rpartition(".")[0]
        text = text.replace(f"from {old_pkg} import {name} as", f"from {new_pkg} import {name} as")
        text = text.replace(f"'{old}'", f"'{new}'").replace(f'"{old}"', f'"{new}"')
        if f"from {old_pkg} import" in text or f"import {old}" in text:
            raise SystemExit(f"an import of {old} was left unrewritten")
    return text


def generate(out: Path, *, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write the generated package to ``out`` (created if needed); return the files written."""
    protos = proto_files(proto_root)
    if not protos:
        raise SystemExit(f"no .proto files under {proto_root}")
    renames = _module_renames(protos)
    well_known = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p) for p in protos],
        ]
        subprocess.run(command, check=True, cwd=proto_root)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "__init__.py"]
        written[0].write_text(INIT, encoding="utf-8")
        for proto in protos:
            for suffix in SUFFIXES:
                source = Path(tmp) / proto.parent / (proto.stem + suffix)
                target = out / (proto.stem + suffix)
                text = _rewrite(source.read_text(encoding="utf-8"), renames)
                target.write_text(text, encoding="utf-8")
                written.append(target)
    stale = [
        p for p in out.iterdir() if p.name.endswith(SUFFIXES) and p not in written
    ]  # from a .proto that no longer exists
    for path in stale:
        path.unlink()
    return written


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output package directory")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
