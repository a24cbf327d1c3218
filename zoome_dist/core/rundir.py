"""The run folder: every file one training run (``zoome train --out DIR``) writes, named once.

Training writes it; the CV driver, Ray trials, ``zoome predict`` and the tests read it, all through
this type, so a file's name lives here and nowhere else.

    config.yaml            the resolved config the run trained with
    deepspeed.json         the DeepSpeed config derived from it
    run.json               the job: shards, fold, train folds, world size, loader, batch plan
    metrics.jsonl          one JSON line per epoch (loss, lr, img/s, data wait, validation metrics)
    curves.png             training loss, validation AUC and lr per epoch (redrawn every epoch)
    predictions.csv        out-of-fold probabilities of the best epoch; predictions_last.csv: the last
    predictions_train.csv  the last epoch's training predictions (every rank's; the Youden threshold's data)
    subgroups.csv          the last epoch's AUC per source, sex, age band, site (Fitzpatrick type), with counts
    calibration.png        the last epoch's reliability diagram (its ECE is ``val_ece`` in metrics.jsonl)
    model_best.pt          best epoch's weights + config + metadata encoding (``zoome predict --select best``);
                           model_last.pt: the last epoch's (``--select last``, the default); ``zoome cv``
                           adds its out-of-fold threshold and temperature to them (``calibration``)
    best.json              the best epoch, its checkpoint tag and metrics
    summary.json           written last: the run finished
    checkpoints/latest     names the newest DeepSpeed checkpoint checkpoints/stepNNNNNNN/ (checkpoints/ is
                           removed once the run has finished with ``--keep models``, ``zoome cv``'s default)
    checkpoints/committed  the newest one every rank has finished writing (what is copied to storage)
    tensorboard/           DeepSpeed's TensorBoard monitor; monitor/: its CSV monitor (monitor.csv)
    flops.txt              DeepSpeed's flops profile (monitor.flops_profile_step)
    job.log, rank<R>.log   output of a CV job / a Ray trial's ranks; .rendezvous: their rendezvous file
    .lock                  flock held by rank 0 while the run trains (pid and host inside)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MODEL_BEST = "model_best.pt"  # also what ``zoome predict`` looks for under a folder of runs
MODEL_LAST = "model_last.pt"
SELECT = ("last", "best")  # epoch-selection rule of the CV report and ``zoome predict``


def _check_select(select: str) -> None:
    if select not in SELECT:
        raise ValueError(f"select must be one of {list(SELECT)}, got {select!r}")


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    config = property(lambda self: self.path / "config.yaml")
    deepspeed = property(lambda self: self.path / "deepspeed.json")
    run_info = property(lambda self: self.path / "run.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    curves = property(lambda self: self.path / "curves.png")
    subgroups = property(lambda self: self.path / "subgroups.csv")
    calibration_plot = property(lambda self: self.path / "calibration.png")
    summary = property(lambda self: self.path / "summary.json")
    train_predictions = property(lambda self: self.path / "predictions_train.csv")
    model_best = property(lambda self: self.path / MODEL_BEST)
    best = property(lambda self: self.path / "best.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    latest = property(lambda self: self.path / "checkpoints" / "latest")
    committed = property(lambda self: self.path / "checkpoints" / "committed")

    def committed_tag(self) -> str | None:
        """The newest checkpoint every rank finished writing (``latest`` for runs from before that file)."""
        for marker in (self.committed, self.latest):
            try:
                tag = marker.read_text().strip()
            except OSError:
                continue
            if tag:
                return tag
        return None
    tensorboard = property(lambda self: self.path / "tensorboard")
    monitor_csv = property(lambda self: self.path / "monitor")
    flops = property(lambda self: self.path / "flops.txt")
    job_log = property(lambda self: self.path / "job.log")
    rendezvous = property(lambda self: self.path / ".rendezvous")
    lock = property(lambda self: self.path / ".lock")

    def predictions(self, select: str = "best") -> Path:
        """Out-of-fold probabilities of the ``best`` or the ``last`` epoch."""
        _check_select(select)
        return self.path / ("predictions.csv" if select == "best" else "predictions_last.csv")

    def model(self, select: str) -> Path:
        """The weights of the ``best`` or the ``last`` epoch."""
        _check_select(select)
        return self.path / (MODEL_BEST if select == "best" else MODEL_LAST)

    def rank_log(self, rank: int) -> Path:
        return self.path / f"rank{rank}.log"

    @property
    def finished(self) -> bool:
        """The run wrote its summary (its last file)."""
        return self.summary.is_file()

    @property
    def resumable(self) -> bool:
        """A checkpoint exists to ``--resume`` from."""
        return self.latest.is_file()

    def resume_args(self) -> list[str]:
        """``zoome train`` arguments that continue a killed or failed earlier attempt where it stopped."""
        return ["--resume"] if self.resumable else []

    def read_summary(self) -> dict:
        return json.loads(self.summary.read_text())

    def read_metrics(self) -> list[dict]:
        """The epochs written so far (a line being written is not returned)."""
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines(keepends=True)
                if line.endswith("\n") and line.strip()]

    def fold_metrics(self, select: str) -> dict:
        """The validation metrics a CV reports for this run: its ``best`` or ``last`` epoch's."""
        s = self.read_summary()
        if select == "best":
            return s["best"]["metrics"]
        return {k[4:]: v for k, v in s["last"].items() if k.startswith("val_")}


def fold_dir(out: Path, variant: str, fold: int) -> Path:
    """Where the CV's job (variant, fold) trains: its run folder."""
    return out / variant / f"fold-{fold:02d}"
