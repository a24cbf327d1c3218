"""Score new images with trained checkpoints: ensemble of fold models, test-time augmentation.

Metadata is encoded with the encoding stored in the checkpoint (the training manifest's), never
re-derived; images go through the same evaluation geometry as validation (``eval_images``: whole
image resized to the training ``image_size``), decoded by DALI where it imports.
"""
from __future__ import annotations

import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from zoome_dist.config import Config
from zoome_dist.core.rundir import MODEL_BEST, MODEL_LAST, SELECT, RunDir
from zoome_dist.core.safe_load import safe_load
from zoome_dist.data.images import BadImage, prepare_image
from zoome_dist.data.metadata import MetadataEncoding
from zoome_dist.data.sources import ARCHIVE_CSV, IMAGE_EXTS, FolderImages
from zoome_dist.data.tables import check_columns, check_image_name, parse_age, read_csv_text, short_rows
from zoome_dist.eval.calibration import apply_temperature
from zoome_dist.pipeline import LOADERS, resolve_device
from zoome_dist.train.engine import build_model

TEST_COLUMNS = ("image_name", "sex", "age_approx", "anatom_site_general_challenge")
TTA_VIEWS = (1, 2, 8)
ENSEMBLES = ("mean", "rank")


@dataclass
class Member:
    path: Path
    model: torch.nn.Module
    cfg: Config
    encoding: MetadataEncoding
    metrics: dict  # the saved epoch's validation metrics (``threshold`` among them)
    calibration: dict  # out-of-fold threshold and temperature stored by ``zoome cv`` (empty before)


def find_checkpoints(paths: list[str], select: str = "last") -> list[Path]:
    """Each path: a model file, a run folder holding one, or a folder of runs (e.g. a CV); ``select``
    picks the last epoch's weights (``model_last.pt``, the CV report's default) or the best epoch's."""
    if select not in SELECT:
        raise ValueError(f"Invalid --select {select!r}. Valid: {list(SELECT)}")
    name = MODEL_LAST if select == "last" else MODEL_BEST
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif RunDir(p).model(select).is_file():
            found.append(RunDir(p).model(select))
        elif p.is_dir() and sorted(p.rglob(name)):
            found += sorted(p.rglob(name))
        else:
            other = MODEL_BEST if select == "last" else MODEL_LAST
            has_other = p.is_dir() and ((p / other).is_file() or any(p.rglob(other)))
            hint = f"; it has {other}: pass --select {'best' if select == 'last' else 'last'}" if has_other else ""
            raise FileNotFoundError(f"no checkpoint at {p}: expected {name}, a run folder or a CV folder{hint}")
    return found


def load_member(path: Path, device: torch.device) -> Member:
    state = safe_load(path, map_location="cpu")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a zoome_dist model_best.pt")
    for key in ("config", "state_dict", "metadata_encoding"):
        if key not in state:
            raise ValueError(f"{path}: not a zoome_dist model_best.pt (no {key!r})")
    tree = state["config"]
    tree["model"]["pretrained"] = None  # the weights below replace any initialisation
    cfg = Config.from_tree(tree)
    model = build_model(cfg)
    try:
        model.load_state_dict(state["state_dict"], strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:  # keys or shapes that are not this config's model
        first = str(e).strip().splitlines()
        raise ValueError(f"{path}: its weights do not fit the {cfg.model.name}/{cfg.model.backbone} model its config "
                         f"describes ({first[1].strip() if len(first) > 1 else first[0] if first else type(e).__name__}); "
                         "the file is damaged or was edited") from None
    return Member(path, model.to(device).eval(), cfg, MetadataEncoding.from_dict(state["metadata_encoding"]),
                  dict(state.get("metrics") or {}), dict(state.get("calibration") or {}))


def check_ensemble(members: list[Member], calibrate: bool = False) -> tuple[MetadataEncoding, int]:
    """The members' shared ``(metadata encoding, image size)``; an error if they differ, or if
    ``calibrate`` and one has no out-of-fold temperature (``zoome predict`` and ``zoome export``)."""
    if not members:
        raise ValueError("no checkpoint given")
    enc, size = members[0].encoding, members[0].cfg.data.image_size
    for m in members[1:]:
        if m.encoding != enc or m.cfg.data.image_size != size:
            raise ValueError(f"{m.path}: ensemble members must share the metadata encoding and image size "
                             f"({members[0].path} has image_size {size})")
    if calibrate and any("temperature" not in m.calibration for m in members):
        raise ValueError("--calibrate: a member has no out-of-fold temperature (stored by the `zoome cv` report)")
    return enc, size


def decision_threshold(members: list[Member], threshold: str | None) -> float | None:
    """``--threshold``: ``oof`` (the out-of-fold threshold ``zoome cv`` stored in the members), or a
    probability such as ``0.5``; None: no decision column."""
    if threshold is None:
        return None
    if threshold == "oof":
        values = {m.calibration.get("threshold") for m in members}
        if None in values:
            missing = [str(m.path) for m in members if "threshold" not in m.calibration][:3]
            raise ValueError(f"--threshold oof: no out-of-fold threshold in {missing} (it is stored by the CV "
                             "report: run `zoome cv` over the folds, or give --threshold VALUE)")
        if len(values) > 1:
            raise ValueError(f"--threshold oof: the members carry different out-of-fold thresholds {sorted(values)} "
                             "(models of different variants?); score one variant at a time")
        return values.pop()
    try:
        value = float(threshold)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise ValueError(f"Invalid --threshold {threshold!r}: 'oof' or a probability in (0, 1), e.g. 0.5")
    return value


def read_test_csv(csv: str | Path, enc: MetadataEncoding) -> tuple[pd.DataFrame, np.ndarray, list[dict]]:
    """ISIC test-CSV rows (labels optional) that can be scored, their metadata vectors, in input order,
    and the rows that cannot (``{"image_name", "reason"}``). The rules are the shard builder's
    (``zoome_dist.data.isic``): safe image names, an age that is blank or a finite 0..120."""
    df = read_csv_text(Path(csv), dtype=str, keep_default_na=False)
    check_columns(df, TEST_COLUMNS, csv)
    short = short_rows(df, TEST_COLUMNS)
    problems = [{"image_name": str(n), "reason": "malformed CSV row: too few fields"} for n in df["image_name"][short]]
    df = df[~short]
    dup = df["image_name"][df["image_name"].duplicated()].tolist()
    if dup:
        raise ValueError(f"{csv}: duplicate image name(s) {dup[:10]}")
    vectors, keep = [], []
    for i, (name, age, sex, site) in enumerate(zip(df["image_name"], df["age_approx"], df["sex"],
                                                   df["anatom_site_general_challenge"])):
        value = parse_age(age)
        why = check_image_name(name) or (f"malformed age_approx {age!r} (blank, or a number in 0..120)"
                                         if value is None else None)
        if why:
            problems.append({"image_name": name, "reason": why})
            continue
        keep.append(i)
        vectors.append(enc.encode(None if np.isnan(value) else value, sex, site))
    meta = np.stack(vectors) if vectors else np.zeros((0, enc.dim), np.float32)
    return df.iloc[keep].reset_index(drop=True), meta, problems


def read_image_folder(images: Path, enc: MetadataEncoding) -> tuple[pd.DataFrame, np.ndarray, list[dict]]:
    """Every image of a folder without a test CSV, with its metadata vector. With an ISIC Archive
    ``metadata.csv`` there (``isic image download``): its rows, in its order, their age, sex and site read
    as the shard builder reads them; otherwise every ``IMAGE_EXTS`` file sorted by name, metadata unknown
    (age missing, sex and site ``unknown``)."""
    from zoome_dist.data.archive import archive_site

    if (images / ARCHIVE_CSV).is_file():
        df = read_csv_text(images / ARCHIVE_CSV, dtype=str, keep_default_na=False)
        if "isic_id" not in df.columns:
            raise ValueError(f"{images / ARCHIVE_CSV}: not an ISIC Archive metadata.csv (no isic_id column); "
                             f"found {list(df.columns)}")
        problems, keep, vectors, seen = [], [], [], set()
        for i, rec in enumerate(df.to_dict("records")):
            age = parse_age(rec.get("age_approx", ""))
            name = rec["isic_id"].strip()
            why = check_image_name(name) or (
                f"malformed age_approx {rec['age_approx']!r}" if age is None else None) or (
                f"listed again in {ARCHIVE_CSV} (scored once, with its first row)" if name in seen else None)
            seen.add(name)
            if why:
                problems.append({"image_name": rec["isic_id"], "reason": why})
                continue
            keep.append(i)
            vectors.append(enc.encode(None if np.isnan(age) else age, rec.get("sex", ""), archive_site(rec, enc)[1]))
        unlisted = sorted({p.stem for p in images.iterdir() if p.suffix in IMAGE_EXTS and p.is_file()} - seen)
        problems += [{"image_name": n, "reason": f"not listed in {ARCHIVE_CSV} (no metadata): pass --csv to score it"}
                     for n in unlisted]
        meta = np.stack(vectors) if vectors else np.zeros((0, enc.dim), np.float32)
        return pd.DataFrame({"image_name": df["isic_id"].iloc[keep].str.strip().to_numpy()}), meta, problems
    names = sorted({p.stem for p in images.iterdir() if p.suffix in IMAGE_EXTS and p.is_file()})
    if not names:
        raise ValueError(f"--images {images}: no images ({', '.join(IMAGE_EXTS)}) in the folder")
    meta = np.tile(enc.encode(None, None, None), (len(names), 1))
    return pd.DataFrame({"image_name": names}), meta, []


def uses_metadata(member: Member) -> bool:
    from zoome_dist.models import MODELS

    return bool(MODELS[member.cfg.model.name][1].get("meta"))


def scorable_image(path: Path | None, scratch: Path, key: str) -> tuple[Path | None, str | None]:
    """``(file to decode, None)`` for an image the shard builder would accept, by the builder's own rules
    (``data.images.prepare_image``): a JPEG or PNG as it is (both loaders decode them); another format
    (GIF, BMP, TIFF, ICO, ... under any extension) as the builder's RGB JPEG, written into ``scratch`` as
    ``key``.jpg. ``(None, why)`` for one the builder would skip: missing, truncated, damaged, not an image."""
    if path is None or not path.is_file():
        return None, "missing image file"
    raw = path.read_bytes()
    try:
        jpeg, _, _ = prepare_image(raw, path.name)
    except BadImage as e:
        return None, str(e)
    if raw[:3] == b"\xff\xd8\xff" or raw[:8] == b"\x89PNG\r\n\x1a\n":
        return path, None
    converted = scratch / f"{key}.jpg"
    converted.write_bytes(jpeg)
    return converted, None


def tta_views(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """1: identity; 2: + horizontal flip; 8: {identity, h, v, hv} × {as is, transposed}."""
    if n not in TTA_VIEWS:
        raise ValueError(f"Invalid --tta {n}. Valid values: {list(TTA_VIEWS)}")
    views = [x] if n == 1 else [x, x.flip(3)]
    if n == 8:
        views += [x.flip(2), x.flip(2).flip(3)]
        views += [v.transpose(2, 3) for v in views]
    return views


@torch.no_grad()
def tta_probability(model: torch.nn.Module, image: torch.Tensor, meta: torch.Tensor, n: int) -> torch.Tensor:
    """P(melanoma) per image: the mean over the ``n`` TTA views of each view's probability."""
    return torch.stack([torch.sigmoid(model(v.contiguous(), meta).float()) for v in tta_views(image, n)]).mean(0)


def torch_device(device: str) -> tuple[str, torch.device]:
    """``--device`` (auto | gpu | cpu) → (where images decode: gpu/cpu, the model's torch device): the one
    device resolution of ``zoome predict`` and ``zoome explain``."""
    kind = resolve_device(device)
    # an indexed device: torchvision rebuilds (and leaks) its nvJPEG decoder when "cuda" and "cuda:0" alternate
    return kind, torch.device("cuda", torch.cuda.current_device()) if kind == "gpu" else torch.device("cpu")


def image_batches(files: list[str], image_size: int, batch_size: int, device: str = "auto",
                  loader: str = LOADERS[0], threads: int = 2) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """The model inputs of ``files`` as ``(indices, batch)``, in order: the one decode path of ``zoome
    predict`` and ``zoome explain`` (so an explanation's probability is the prediction's)."""
    kind, dev = torch_device(device)
    if loader == "dali":
        return _dali_images(files, image_size, batch_size, kind, 0, threads)
    return _torch_images(files, image_size, batch_size, dev)


def _dali_images(files: list[str], image_size: int, batch: int, device: str, device_id: int,
                 threads: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    from zoome_dist.pipeline.dali import eval_images

    @pipeline_def
    def pipe():
        jpegs, idx = fn.readers.file(files=files, labels=list(range(len(files))), name="Reader",
                                     pad_last_batch=True)
        return eval_images(jpegs, image_size, device), idx

    p = pipe(batch_size=batch, num_threads=threads, device_id=device_id if device == "gpu" else None)
    p.build()
    for b in DALIGenericIterator(p, ["image", "idx"], reader_name="Reader",
                                 last_batch_policy=LastBatchPolicy.PARTIAL):
        yield b[0]["idx"].view(-1).cpu().numpy(), b[0]["image"]


def _torch_images(files: list[str], image_size: int, batch: int, device: torch.device
                  ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Per image on the CPU; on a GPU one nvJPEG decode + resize per batch (``BatchAugment``)."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    from zoome_dist.pipeline.augment import Augment
    from zoome_dist.pipeline.batch_augment import BatchAugment
    from zoome_dist.pipeline.torch_loader import make_transform

    tf = make_transform(False, image_size, Augment())
    gpu = BatchAugment(False, image_size, Augment(), device) if device.type == "cuda" else None
    for start in range(0, len(files), batch):
        part = files[start:start + batch]
        images = None
        if gpu is not None:
            try:
                images = gpu([read_file(f) for f in part])
            except RuntimeError:  # nvJPEG takes baseline JPEGs only (not PNG-under-.jpg, CMYK): this batch on CPU
                images = None
        if images is None:
            images = torch.stack([tf(decode_image(f, mode=ImageReadMode.RGB)) for f in part])
        yield np.arange(start, start + len(part)), images


@torch.no_grad()
def predict(members: list[Member], csv: str | Path | None, images: str | Path, tta: int = 1, batch_size: int = 32,
            device: str = "auto", loader: str = LOADERS[0], threads: int = 2, progress: bool = False,
            ensemble: str = "mean", calibrate: bool = False, threshold: str | None = None
            ) -> tuple[pd.DataFrame, list[dict]]:
    """``(predictions, problems)``: one row per scorable input image in input order (``image_name``,
    ``prob`` = mean over members and views), and every image that could not be scored with why.
    ``csv`` None: every image of the folder (``read_image_folder``). ``ensemble``: ``mean`` of the members'
    probabilities, or ``rank`` (each member's probabilities turned into ranks in [0, 1] over these images,
    averaged: what the SIIM-ISIC 2020 winners used; a score for ordering, not a probability).
    ``calibrate``: each member's probabilities through its out-of-fold temperature first. ``threshold``:
    add a ``decision`` column (``decision_threshold``): ``oof`` compares the uncalibrated ensemble mean
    with the stored threshold (fit on uncalibrated probabilities, so ``calibrate`` never changes these
    decisions); a VALUE compares the written ``prob``."""
    if ensemble not in ENSEMBLES:
        raise ValueError(f"Invalid --ensemble {ensemble!r}. Valid: {list(ENSEMBLES)}")
    enc, size = check_ensemble(members, calibrate)
    cut = decision_threshold(members, threshold)
    if cut is not None and ensemble == "rank":
        raise ValueError("--threshold applies to probabilities; --ensemble rank writes ranks: use --ensemble mean")
    tta_views(torch.zeros(1, 1, 1, 1), tta)  # validate early
    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"--images folder not found: {images}")
    if csv is not None:
        df, meta, problems = read_test_csv(csv, enc)
    else:
        df, meta, problems = read_image_folder(images, enc)
        if any(uses_metadata(m) for m in members) and not (images / ARCHIVE_CSV).is_file():
            print(f"zoome predict: warning: no --csv and no {ARCHIVE_CSV} in {images}: scoring with age, sex and "
                  "site unknown; models trained with metadata are less accurate without it", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="zoome-predict-") as scratch:
        store, keep, paths = FolderImages(images), [], []
        for i, name in enumerate(df["image_name"]):
            path, why = scorable_image(store.find(name), Path(scratch), str(i))
            if why:
                problems.append({"image_name": name, "reason": why})
            else:
                keep.append(i)
                paths.append(str(path))
        probs = _score(members, paths, meta[keep], size, tta, batch_size, device, loader, threads, progress)
    raw = probs.mean(0)  # the uncalibrated ensemble mean: what an out-of-fold threshold was fit on
    if calibrate:
        probs = np.stack([apply_temperature(p, m.calibration["temperature"]) for p, m in zip(probs, members)])
    if ensemble == "rank" and probs.shape[1] > 1:
        probs = np.stack([pd.Series(p).rank(pct=True).to_numpy() for p in probs])
    out = pd.DataFrame({"image_name": df["image_name"].iloc[keep].to_numpy(), "prob": probs.mean(0)})
    if cut is not None:
        out["decision"] = ((raw if threshold == "oof" else out["prob"].to_numpy()) >= cut).astype(int)
    return out, problems


def _score(members: list[Member], paths: list[str], meta: np.ndarray, size: int, tta: int, batch_size: int,
           device: str, loader: str, threads: int, progress: bool) -> np.ndarray:
    """(members, images) probabilities, each the mean over the TTA views."""
    _, dev = torch_device(device)
    probs = np.zeros((len(members), len(paths)))
    if paths:
        batches = image_batches(paths, size, batch_size, device, loader, threads)
        meta_t = torch.from_numpy(meta)
        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
        for idx, image in batches:
            image = image.to(dev)
            m = meta_t[idx].to(dev)
            for k, member in enumerate(members):
                probs[k, idx] = tta_probability(member.model, image, m, tta).cpu().numpy()
            bar.update(len(idx))
        bar.close()
    return probs
