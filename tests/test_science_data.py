"""What the model sees: metadata vectors written out by hand (docs/paper.md's 12-value encoding)
through CSV → shards → loader, folds grouped by patient and by duplicate, and the samples each
rank's loaders yield for every fold."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from zoome_dist.data.writer import BuildOptions, build
from zoome_dist.pipeline import LOADERS, make_loader

# (age, sex, site) → the encoding, from the paper digest: [age/90, age missing] + sex one-hot
# {male, female, unknown} + site one-hot {head/neck, upper extremity, lower extremity, torso,
# palms/soles, oral/genital, unknown}; ISIC 2019's "anterior torso" is torso.
ROWS = [
    (45, "female", "torso",           [0.5, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0]),
    ("", "male", "head/neck",         [0.0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]),
    (90, "", "lower extremity",       [1.0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0]),
    (18, "female", "palms/soles",     [0.2, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0]),
    (72, "male", "oral/genital",      [0.8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
    (9, "male", "upper extremity",    [0.1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0]),
    (63, "female", "",                [0.7, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1]),
    (27, "male", "anterior torso",    [0.3, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
    (36, "female", "Head/Neck",       [0.4, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0]),
    (0, "female", "torso",            [0.0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0]),
    (54, "Male", "TORSO",             [0.6, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0]),  # spellings of the wild
    (81, " FEMALE ", "posterior torso", [0.9, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0]),
]


def _jpeg(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)  # distinct noise: no two images are duplicates
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path, quality=95)


@pytest.fixture(scope="module")
def meta_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("meta")
    (root / "img").mkdir()
    rows = []
    for i, (age, sex, site, _) in enumerate(ROWS * 2):  # each encoding twice, 2 folds
        _jpeg(root / "img" / f"M_{i:03d}.jpg", i)
        rows.append({"image_name": f"M_{i:03d}", "patient_id": f"Q{i}", "sex": sex, "age_approx": age,
                     "anatom_site_general_challenge": site, "target": i % 2})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    build(root / "train.csv", root / "img", root / "shards", BuildOptions(folds=2, max_side=0, samples_per_shard=4),
          progress=False)
    return root / "shards"


@pytest.mark.parametrize("loader", LOADERS)
def test_metadata_vectors_reach_the_model_as_written_by_hand(meta_shards, loader):
    folds = pd.read_csv(meta_shards / "folds.csv")
    seen = {}
    for train in (False, True):
        it, _ = make_loader(meta_shards, [0, 1], train=train, batch_size=4, image_size=16, device="cpu",
                            loader=loader, num_threads=1)
        for _image, meta, label, sid in it:
            for m, y, s in zip(meta.numpy(), label.numpy(), sid.numpy()):
                seen.setdefault(int(s), []).append((m, int(y)))
    assert sorted(seen) == sorted(folds["sample_id"])
    for _, row in folds.iterrows():
        i = int(row["image_name"][2:])
        want = np.array(ROWS[i % len(ROWS)][3], dtype=np.float32)
        for m, y in seen[int(row["sample_id"])]:  # validation and training batches alike
            assert m.dtype == np.float32 and m.shape == (12,)
            np.testing.assert_allclose(m, want, rtol=0, atol=1e-6, err_msg=row["image_name"])
            assert y == i % 2, row["image_name"]


def _patient_build(root: Path) -> Path:
    """30 patients × 2 lesions (Q00..Q29); six patients share an identical image with another patient
    (the same photograph filed twice: one person under two ids)."""
    (root / "img").mkdir(parents=True)
    rows, rng = [], np.random.default_rng(7)
    for p in range(30):
        for j in range(2):
            name = f"D_{p:02d}_{j}"
            _jpeg(root / "img" / f"{name}.jpg", 1000 + 2 * p + j)
            rows.append({"image_name": name, "patient_id": f"Q{p:02d}", "sex": "male", "age_approx": 50,
                         "anatom_site_general_challenge": "torso", "target": int(rng.random() < 0.3)})
    links = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)]
    for a, b in links:  # patient b's second image is a byte copy of patient a's first
        (root / "img" / f"D_{b:02d}_1.jpg").write_bytes((root / "img" / f"D_{a:02d}_0.jpg").read_bytes())
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    build(root / "train.csv", root / "img", root / "shards", BuildOptions(folds=3, max_side=0, samples_per_shard=8),
          progress=False)
    return root / "shards"


def test_patients_and_duplicate_linked_patients_never_span_folds(tmp_path):
    shards = _patient_build(tmp_path)
    folds = pd.read_csv(shards / "folds.csv")
    by_patient = folds.groupby("patient_id")["fold"].nunique()
    assert (by_patient == 1).all(), f"patients in two folds: {list(by_patient[by_patient > 1].index)}"
    fold_of = folds.set_index("patient_id")["fold"].groupby(level=0).first()
    manifest = json.loads((shards / "manifest.json").read_text())
    dropped = manifest["duplicates"]["dropped"]
    assert len(dropped) == 6
    for d in dropped:  # the dropped copy's patient and the kept copy's patient: one fold
        kept_p, dropped_p = "Q" + d["kept"][2:4], "Q" + d["dropped"][2:4]
        assert fold_of[kept_p] == fold_of[dropped_p], d
    assert folds["fold"].nunique() == 3


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("world", [1, 2])
def test_each_rank_trains_only_on_the_training_folds(shards_dir, loader, world):
    """For every validation fold: the training loaders of all ranks yield only samples of the other
    folds (all of them, but the few a rank's last partial batch drops), and the validation loaders
    yield exactly the fold, each sample once over the ranks."""
    table = pd.read_csv(shards_dir / "folds.csv")
    n_folds = table["fold"].nunique()
    for fold in range(n_folds):
        others = [k for k in range(n_folds) if k != fold]
        allowed = set(table.loc[table["fold"] != fold, "sample_id"])
        val = sorted(table.loc[table["fold"] == fold, "sample_id"])
        trained, validated = [], []
        for rank in range(world):
            common = dict(image_size=16, rank=rank, world_size=world, device="cpu", loader=loader, num_threads=1)
            it, steps = make_loader(shards_dir, others, train=True, batch_size=4, seed=1, **common)
            batches = iter(it)  # one epoch: the loader's steps per epoch
            trained += [int(s) for _ in range(steps) for s in next(batches)[3]]
            vit, _ = make_loader(shards_dir, [fold], train=False, batch_size=5, **common)
            validated += [int(s) for b in vit for s in b[3]]
        assert set(trained) <= allowed, f"fold {fold}: trained on {sorted(set(trained) - allowed)[:5]}"
        assert len(allowed - set(trained)) < 4 * world, f"fold {fold}: training misses {len(allowed - set(trained))}"
        assert sorted(validated) == val, f"fold {fold}, {world} rank(s): validation is not the fold exactly once"


def test_patients_sharing_a_lesion_land_in_one_fold():
    """ISIC 2019 / Archive rows: two patient ids that share a lesion id are one person's lesion (14 such
    pairs, 3 folds: by chance all 14 would share a fold with probability 3^-14)."""
    from zoome_dist.data.dedup import groups
    from zoome_dist.data.folds import assign_folds

    n = 30
    table = pd.DataFrame({"patient_id": [f"P{i:02d}" for i in range(n)],
                          "lesion_id": [f"L{i // 2:02d}" if i < 30 else "" for i in range(n)],
                          "target": [int(i % 5 == 0) for i in range(n)]})
    table.loc[28:, "lesion_id"] = ""  # the last two rows: no lesion id, their own groups
    table["group"] = groups(table, [])
    folds = assign_folds(table, 3, seed=0)
    for i in range(0, 28, 2):
        assert table["group"][i] == table["group"][i + 1] and folds[i] == folds[i + 1], i
    assert table["group"][28] != table["group"][29]
