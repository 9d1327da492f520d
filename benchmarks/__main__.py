"""``python -m benchmarks [--quick] [--json FILE] [--only NAME ...]``, from the checkout root."""

import sys

from benchmarks.runner import main

sys.exit(main())
