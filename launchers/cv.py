"""Shim: the cross-validation driver is ``zoome cv`` (``zoome_dist/cv.py``); see its ``--help``."""
import sys

from zoome_dist.cv import main

if __name__ == "__main__":
    sys.exit(main())
