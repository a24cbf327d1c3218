"""A synthetic ISIC-2020-layout dataset: ``train.csv`` + ``jpeg/train/<image_name>.jpg``.

Each patient has an age, a sex and several lesions. A lesion's melanoma risk rises with age and
depends on the anatomic site (as in the epidemiology the paper cites); its label is drawn from that
risk, and the image is rendered from ABCD-like features whose distribution shifts with the label:
Asymmetry, Border irregularity, Colour variety (incl. blue-grey/black), Diameter, and local dark
structures (dots/globules). Classes overlap, so the task is learnable but not trivial.
Everything is a pure function of ``seed`` (each image of ``(seed, index)``), so builds are repeatable.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from zoome_dist.core.files import atomic_path, write_csv_atomic

SITES = ["torso", "lower extremity", "upper extremity", "head/neck", "palms/soles", "oral/genital", ""]
SITE_P = [0.50, 0.25, 0.15, 0.06, 0.01, 0.005, 0.025]
SITE_LOGIT = {"torso": 0.3, "lower extremity": 0.0, "upper extremity": 0.1, "head/neck": 0.8,
              "palms/soles": -0.5, "oral/genital": -0.5, "": 0.0}
SKIN = np.array([[233, 190, 160], [224, 172, 140], [200, 150, 120], [240, 205, 185]], np.float32)
LESION_COLOURS = {
    "light brown": (170, 110, 70), "dark brown": (95, 55, 35), "black": (35, 25, 25),
    "blue-grey": (95, 110, 135), "red": (170, 70, 70), "white": (225, 215, 210)}
CSV_COLUMNS = ["image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge",
               "diagnosis", "benign_malignant", "target"]


@dataclass(frozen=True)
class LesionFeatures:
    asymmetry: float   # 0 round … 1 strongly lopsided
    border: float      # 0 smooth … 1 ragged
    colours: int       # number of distinct colours, 1–5
    diameter: float    # fraction of the image side
    dots: int          # dark dots / globules


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


LABEL_FROM = ("image+metadata", "metadata")


def sample_table(n: int, seed: int, prevalence: float = 0.1, label_from: str = "image+metadata") -> pd.DataFrame:
    """Patients, metadata and labels for ``n`` images (no pixels). ``label_from="metadata"``: a stronger
    metadata risk (age, site *and* sex, no patient effect) and, in ``synthesize``, images without any
    label signal: a test that the metadata path of a model learns (``benchmark.py meta``)."""
    if label_from not in LABEL_FROM:
        raise ValueError(f"Invalid label_from {label_from!r}. Valid: {list(LABEL_FROM)}")
    if n < 1:
        raise ValueError(f"--n must be positive, got {n}")
    if not 0 < prevalence < 1:
        raise ValueError(f"--prevalence must lie in (0, 1), got {prevalence}")
    rng = np.random.default_rng(seed)
    rows, p = [], 0
    while len(rows) < n:
        k = min(1 + rng.poisson(3.0), n - len(rows))
        age = int(np.clip(np.round(rng.normal(50, 17) / 5) * 5, 5, 90))
        sex = rng.choice(["male", "female"])
        missing_age, missing_sex = rng.random() < 0.01, rng.random() < 0.01
        patient_effect = rng.normal(0, 0.5)
        for _ in range(k):
            site = SITES[rng.choice(len(SITES), p=SITE_P)]
            rows.append({"image_name": f"SYN_{len(rows):07d}", "patient_id": f"SYNP_{p:06d}",
                         "sex": "" if missing_sex else sex, "age_approx": "" if missing_age else age,
                         "anatom_site_general_challenge": site,
                         "_logit": (0.045 * (age - 50) + SITE_LOGIT[site] + patient_effect
                                    if label_from == "image+metadata" else
                                    0.1 * (age - 50) + 2 * SITE_LOGIT[site] + 1.0 * (sex == "male"))})
        p += 1
    df = pd.DataFrame(rows)
    # Intercept chosen by bisection so the expected prevalence matches the request.
    lo, hi = -15.0, 15.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _sigmoid(df["_logit"].to_numpy() + mid).mean() < prevalence:
            lo = mid
        else:
            hi = mid
    risk = _sigmoid(df["_logit"].to_numpy() + lo)
    df["target"] = (rng.random(len(df)) < risk).astype(int)
    df["diagnosis"] = np.where(df["target"] == 1, "melanoma", "nevus")
    df["benign_malignant"] = np.where(df["target"] == 1, "malignant", "benign")
    return df[CSV_COLUMNS]


def sample_features(rng: np.random.Generator, target: int) -> LesionFeatures:
    """ABCD-like features: a latent severity, shifted by the label, drives each one (with noise)."""
    sev = rng.normal(1.2 if target else -0.6, 0.9)
    f = lambda shift=0.0: float(_sigmoid(np.array(sev + shift + rng.normal(0, 0.7))))  # noqa: E731
    return LesionFeatures(asymmetry=f(), border=f(),
                          colours=int(np.clip(round(1 + 4 * f(-0.3)), 1, 5)),
                          diameter=0.18 + 0.35 * f(), dots=int(rng.poisson(8 * f(-0.5))))


def render(rng: np.random.Generator, feats: LesionFeatures, size: int) -> np.ndarray:
    """A dermoscopy-like RGB uint8 image of one lesion."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    skin = SKIN[rng.integers(len(SKIN))] + rng.normal(0, 6, 3)
    shade = 1 + 0.08 * np.sin(2 * np.pi * (xx * rng.random() + yy * rng.random()) + rng.random() * 6)
    img = skin[None, None, :] * shade[..., None]

    cx, cy = 0.5 + rng.normal(0, 0.04, 2)
    dx, dy = xx - cx, yy - cy
    theta, dist = np.arctan2(dy, dx), np.hypot(dx, dy)
    radius = feats.diameter / 2 * (1 + 0.45 * feats.asymmetry * np.cos(theta - rng.uniform(0, 2 * np.pi)))
    for k in range(3, 13):
        radius = radius * (1 + feats.border * rng.uniform(0, 0.12) / np.sqrt(k - 2)
                           * np.cos(k * theta + rng.uniform(0, 2 * np.pi)))
    edge = 0.004 + 0.02 * (1 - feats.border)
    alpha = np.clip((radius - dist) / edge, 0, 1)

    names = list(LESION_COLOURS)
    base = np.array(LESION_COLOURS[names[rng.integers(0, 2)]], np.float32)
    lesion = np.broadcast_to(base, img.shape).copy()
    extra = rng.choice([n for n in names if not np.allclose(LESION_COLOURS[n], base)],
                       size=feats.colours - 1, replace=False)
    for name in extra:  # off-centre blobs of other colours make the pattern asymmetric
        ang, r = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.6) * feats.diameter / 2
        sigma = feats.diameter * rng.uniform(0.08, 0.2)
        g = np.exp(-((xx - cx - r * np.cos(ang)) ** 2 + (yy - cy - r * np.sin(ang)) ** 2) / (2 * sigma ** 2))
        lesion += (np.array(LESION_COLOURS[name], np.float32) - lesion) * (0.85 * g)[..., None]
    for _ in range(feats.dots):
        ang, r = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.0) * feats.diameter / 2
        s = rng.uniform(0.006, 0.015)
        d = np.hypot(xx - cx - r * np.cos(ang), yy - cy - r * np.sin(ang))
        lesion *= (1 - 0.75 * np.clip((s - d) / 0.003, 0, 1))[..., None]
    img = img * (1 - alpha[..., None]) + lesion * alpha[..., None]

    for _ in range(rng.poisson(2)):  # hairs: nuisance for both classes
        a, b, c = rng.normal(0, 1, 3)
        line = np.abs(a * (xx - 0.5) + b * (yy - 0.5) + 0.3 * c) / np.hypot(a, b)
        img *= (1 - 0.6 * np.clip((0.0025 - line) / 0.0015, 0, 1))[..., None]
    vignette = np.clip(1.35 - 1.1 * np.hypot(xx - 0.5, yy - 0.5), 0, 1)
    img = img * vignette[..., None] + rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _make_image(args: tuple[int, int, int, str, Path, int]) -> None:
    seed, index, target, name, out_dir, size = args  # target -1: a lesion drawn without label signal
    rng = np.random.default_rng([seed, index])
    pixels = render(rng, sample_features(rng, int(rng.random() < 0.5) if target < 0 else target), size)
    with atomic_path(out_dir / f"{name}.jpg") as tmp:
        Image.fromarray(pixels).save(tmp, format="JPEG", quality=92)


def synthesize(out: str | Path, n: int, seed: int = 0, prevalence: float = 0.1, size: int = 256,
               workers: int = 1, progress: bool = True, label_from: str = "image+metadata") -> Path:
    """Write ``out/train.csv`` and ``out/jpeg/train/*.jpg``; returns the CSV path. ``label_from="metadata"``:
    every image's lesion is drawn as benign- or melanoma-like by a coin flip independent of its label."""
    if size < 32:
        raise ValueError(f"--size must be at least 32 px, got {size}")
    out = Path(out)
    img_dir = out / "jpeg" / "train"
    img_dir.mkdir(parents=True, exist_ok=True)
    table = sample_table(n, seed, prevalence, label_from)
    jobs = [(seed, i, int(t) if label_from == "image+metadata" else -1, name, img_dir, size)
            for i, (name, t) in enumerate(zip(table["image_name"], table["target"]))]
    bar = tqdm(total=n, desc="synth", unit="img", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(_make_image, jobs, chunksize=8):
                bar.update()
    else:
        for job in jobs:
            _make_image(job)
            bar.update()
    bar.close()
    csv = out / "train.csv"
    write_csv_atomic(table, csv)
    return csv
