"""DeepSpeed training: ``run(cfg, shards, fold, out)`` is what the launcher, Ray and the tests call."""
