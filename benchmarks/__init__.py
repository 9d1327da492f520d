"""fedsynth benchmarks: ``python -m benchmarks [--quick] [--json FILE] [--only NAME ...]``."""
