"""Ray Tune entry points (``tuning/tune.py``, ``tuning/cluster.yaml``)."""
