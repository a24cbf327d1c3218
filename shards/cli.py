"""Shim for ``python shards/cli.py build | verify | synth``: the shard builder is ``zoome-shards``
(``zoome_dist/cli/shards.py``); see its ``--help``."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "zoome_dist" / "__init__.py").is_file() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from zoome_dist.cli.shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
