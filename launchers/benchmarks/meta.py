"""Does the metadata path learn? Synthetic data whose images carry no label signal and whose label
depends on age, sex and site only (``zoome-shards synth --label-from metadata``):

- the **oracle**: a logistic regression on the 12 encoded metadata values, read back from our own
  shards through our own loader (training folds → validation fold), i.e. what the metadata allows;
- ``zoome`` as the paper reads it (metadata as a sigmoid gate on the last feature map),
- ``zoome`` with each of the given alternatives (e.g. ``model.meta_fusion=concat``),
- ``zoome_no_meta`` (no metadata: should sit near 0.5),

each trained with the demo recipe (``launchers/configs/demo-cpu.yaml``, ``epochs`` epochs, ``size`` px)
on fold 0 of the same shards; AUC of the last epoch and its ratio to the oracle's.
"""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from zoome_dist.core.rundir import RunDir
from zoome_dist.data.synth import synthesize
from zoome_dist.data.writer import BuildOptions, build
from zoome_dist.launch.command import Launch, train_command

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {"zoome (paper: gate)": [],
            "zoome concat": ["model.meta_fusion=concat"],
            "zoome concat, meta lr ×10": ["model.meta_fusion=concat", "optim.meta_lr_mult=10"],
            "zoome gate, meta lr ×10": ["optim.meta_lr_mult=10"],
            "zoome_no_meta": ["model.name=zoome_no_meta"]}


def oracle_auc(shards: Path, val_fold: int, folds: int) -> float:
    """Logistic regression on the metadata vectors as our loader yields them."""
    from zoome_dist.pipeline import make_loader

    def read(fold_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        it, _ = make_loader(shards, fold_ids, train=False, batch_size=64, image_size=32, num_threads=1)
        metas, labels = [], []
        for _, meta, label, _ in it:
            metas.append(np.asarray(meta, dtype=np.float32))
            labels.append(np.asarray(label).ravel())
        return np.concatenate(metas), np.concatenate(labels).astype(int)

    x_tr, y_tr = read([k for k in range(folds) if k != val_fold])
    x_va, y_va = read([val_fold])
    model = LogisticRegression(max_iter=2000).fit(x_tr, y_tr)
    return float(roc_auc_score(y_va, model.predict_proba(x_va)[:, 1]))


def bench_meta(n: int = 800, size: int = 64, epochs: int = 8, folds: int = 5, ranks: int = 2,
               variants: dict[str, list[str]] | None = None) -> dict:
    variants = VARIANTS if variants is None else variants
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize(root / "src", n, seed=0, prevalence=0.2, size=size, workers=2, progress=False,
                   label_from="metadata")
        build(root / "src" / "train.csv", root / "src" / "jpeg" / "train", root / "shards",
              BuildOptions(folds=folds, max_side=0, samples_per_shard=128), workers=2, progress=False)
        out: dict = {"n": n, "size": size, "epochs": epochs, "oracle_auc": round(oracle_auc(root / "shards", 0, folds), 4)}
        for name, sets in variants.items():
            run = root / name.replace(" ", "_").replace(",", "").replace("×", "x").replace(":", "").replace("(", "").replace(")", "")
            args = ["--config", str(ROOT / "launchers" / "configs" / "demo-cpu.yaml"), "--shards", str(root / "shards"),
                    "--fold", "0", "--out", str(run), "--no-progress", "--set", f"train.epochs={epochs}",
                    "--set", f"data.image_size={size}"]
            for s in sets:
                args += ["--set", s]
            subprocess.run(train_command(args, Launch(ranks=ranks)), check=True, capture_output=True)
            metrics = RunDir(run).read_metrics()
            auc = metrics[-1]["val_auc"]
            out[name] = {"auc_last": round(auc, 4), "auc_best": round(max(m["val_auc"] for m in metrics), 4),
                         "vs_oracle": round(auc / out["oracle_auc"], 3)}
    return out
