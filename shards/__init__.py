"""``zoome-shards``: ISIC CSV + images → fold-partitioned WebDataset shards."""
