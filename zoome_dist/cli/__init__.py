"""Command lines: ``zoome`` (``main.py``) and ``zoome-shards`` (``shards.py``), one module per command."""
