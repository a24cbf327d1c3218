"""``zoome predict`` throughput with and without test-time augmentation, same images and model."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.shards import reused_dataset
from zoome_dist.config import load_config
from zoome_dist.core.rundir import RunDir
from zoome_dist.data.metadata import MetadataEncoding
from zoome_dist.infer.predict import load_member, predict
from zoome_dist.train.engine import build_model
from zoome_dist.train.run import save_model


def bench_predict(model: str = "zoome", image_size: int = 224, n: int = 64, source_size: int = 512,
                  batch_size: int = 16, ttas: tuple[int, ...] = (1, 8), rounds: int = 2,
                  loader: str | None = None) -> dict:
    """img/s per TTA setting (best of ``rounds`` alternating runs); weights are random (speed only)."""
    from zoome_dist.pipeline import LOADERS

    loader = loader or LOADERS[0]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict = {"model": model, "image_size": image_size, "n": n, "batch_size": batch_size, "device": dev.type, "loader": loader}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        imgs = reused_dataset(root / "src", n, source_size, 2)
        cfg = load_config(overrides={"model.name": model, "data.image_size": image_size})
        save_model(RunDir(root).model_best, cfg, build_model(cfg), MetadataEncoding().to_dict(), 0, {})
        member = load_member(RunDir(root).model_best, dev)
        predict([member], root / "src" / "train.csv", imgs, tta=1, batch_size=batch_size, loader=loader)  # warm-up
        best = {t: 0.0 for t in ttas}
        for _ in range(rounds):
            for t in ttas:
                start = time.perf_counter()
                predict([member], root / "src" / "train.csv", imgs, tta=t, batch_size=batch_size, loader=loader)
                best[t] = max(best[t], n / (time.perf_counter() - start))
    for t in ttas:
        out[f"tta{t}_img_s"] = round(best[t], 2)
    return out
