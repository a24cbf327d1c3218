"""Shim for ``ray submit tuning/cluster.yaml tuning/tune.py -- ARGS`` (Ray runs a file): the search
is ``zoome tune`` (``zoome_dist/cli/tune.py``); see its ``--help``."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run from a checkout: its package first. `ray submit` runs a copy in the home folder: the installed package
if (ROOT / "zoome_dist" / "__init__.py").is_file() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from zoome_dist.cli.tune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
