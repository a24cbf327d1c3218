"""Shim: the cross-validation driver is ``zoome cv`` (``zoome_dist/cli/cv.py``); see its ``--help``."""
import sys

from zoome_dist.cli.cv import main

if __name__ == "__main__":
    sys.exit(main())
