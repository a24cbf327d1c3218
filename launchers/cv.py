"""Shim: the cross-validation driver is ``zoome cv`` (``zoome_dist/launch/cv.py``); see its ``--help``."""
import sys

from zoome_dist.launch.cv import main

if __name__ == "__main__":
    sys.exit(main())
