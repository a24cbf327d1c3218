"""ISIC reading, metadata encoding, folds, synthetic data and WebDataset shards."""
