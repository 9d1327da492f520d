"""Per release and class: how far the class stands apart from the mean, and how clearly.

Prints (and with ``--json`` writes) :func:`fedsynth.server.snr.class_parts` of each release
file: the class part's length over the mean's and its own signal-to-noise ratio, the two
figures ``--contrast`` acts on. No model is loaded; it reads the verified files only.

    python benchmarks/class_part.py RELEASE.safetensors [...] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout

from fedsynth.protocol.manifest import json_float
from fedsynth.server.release import load_release
from fedsynth.server.snr import class_parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("releases", type=Path, nargs="+")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = parser.parse_args(argv)
    rows = []
    for path in args.releases:
        release = load_release(path)
        epsilon = release.manifest.privacy.epsilon
        for part in class_parts(release):
            rows.append(
                {
                    "release": str(path),
                    "release_id": release.release_id,
                    "epsilon": json_float(epsilon),
                    "label": part.label,
                    "share": part.share,
                    "snr": json_float(part.snr),
                }
            )
            snr = "inf" if math.isinf(part.snr) else f"{part.snr:.2f}"
            print(
                f"{release.release_id} eps={rows[-1]['epsilon']} {part.label}: share "
                f"{part.share:.3f}, snr {snr}"
            )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
