"""``python -m attention.bench``: the benchmark report (see :mod:`attention.bench.sweep`)."""

import sys

from .sweep import main

sys.exit(main())
