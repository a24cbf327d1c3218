"""Shim for ``ray submit tuning/cluster.yaml tuning/tune.py -- ARGS`` (Ray runs a file): the search
is ``zoome tune`` (``zoome_dist/tune.py``); see its ``--help``."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `ray submit` runs this file directly, from a checkout
    sys.path.insert(0, str(ROOT))

from zoome_dist.tune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
