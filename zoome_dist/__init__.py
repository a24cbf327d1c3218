"""zoome_dist: distributed training of ZooME (Xing et al.) on ISIC-style data."""
__version__ = "0.1.0"
