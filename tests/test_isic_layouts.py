"""Today's ISIC data: the ISIC Archive download layout, ISIC 2024 with an HDF5 file, a merged 2019 + 2020
build with planted exact and near duplicates, per-source metrics, and ``zoome predict`` on a folder.

The files are small ones written here in each layout (no data can be downloaded), from the images of
the session's synthetic dataset."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from sklearn.metrics import roc_auc_score

from zoome_dist.cli.main import main as zoome_main
from zoome_dist.cli.shards import main as shards_main
from zoome_dist.config import load_config
from zoome_dist.data.manifest import verify
from zoome_dist.data.metadata import MetadataEncoding
from zoome_dist.data.writer import BuildOptions, build
from zoome_dist.eval.subgroups import subgroup_metrics
from zoome_dist.infer.predict import load_member, predict
from zoome_dist.train.engine import build_model
from zoome_dist.train.run import save_model

ROOT = Path(__file__).resolve().parents[1]
OPTS = BuildOptions(folds=2, seed=0, max_side=0, samples_per_shard=16)
ENC = MetadataEncoding()
MEL = ("Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma Invasive")
NEVUS = ("Benign", "Benign melanocytic proliferations", "Nevus")
INDET = ("Indeterminate", "Indeterminate melanocytic proliferations")
BCC = ("Malignant", "Malignant adnexal epithelial proliferations - Follicular", "Basal cell carcinoma")
# anatom_site_1..3 (and the anatom_site_special override) → the site we expect in our vocabulary
SITES = [(("Trunk", "Posterior trunk", ""), "", "torso"),
         (("Lower extremity", "Foot", "Sole of foot"), "", "palms/soles"),
         (("Anogenital region", "", ""), "", "oral/genital"),
         (("Head and neck", "Head", "Face"), "", "head/neck"),
         (("Upper extremity", "Forearm", ""), "acral palms or soles", "palms/soles"),
         (("", "", ""), "", "unknown")]


def synth_images(synth_data: Path) -> list[Path]:
    return sorted((synth_data / "jpeg" / "train").glob("*.jpg"))


def write_archive(root: Path, images: list[Path]) -> pd.DataFrame:
    """An `isic image download` folder: metadata.csv (isic-cli's column order), images with mixed
    extensions, attribution.txt, licenses/."""
    root.mkdir(parents=True)
    rows = []
    for i, src in enumerate(images):
        isic_id = f"ISIC_{9000000 + i:07d}"
        diag = MEL if i % 4 == 0 else (INDET if i == 5 else (BCC if i == 6 else NEVUS))
        if i == 7:
            diag = ("",)  # no diagnosis
        site, special, _ = SITES[i % len(SITES)]
        patient = "" if i % 5 == 1 else ("-1" if i % 5 == 2 else f"IP_{100 + i // 3:07d}")
        lesion = f"IL_{200 + i:07d}" if i % 5 == 1 else ""
        rows.append({"isic_id": isic_id, "attribution": ["Hospital A", "Anonymous"][i % 2],
                     "copyright_license": ["CC-BY", "CC-0", "CC-BY-NC"][i % 3],
                     "age_approx": ["", "35", "60", "80"][i % 4], "anatom_site_1": site[0], "anatom_site_2": site[1],
                     "anatom_site_3": site[2], "anatom_site_special": special,
                     **{f"diagnosis_{k + 1}": (diag[k] if k < len(diag) else "") for k in range(5)},
                     "fitzpatrick_skin_type": ["I", "II", "III", ""][i % 4], "image_type": "dermoscopic",
                     "lesion_id": lesion, "patient_id": patient, "sex": ["male", "female", ""][i % 3]})
        ext = [".jpg", ".JPG", ".png"][i % 3]
        if ext == ".png":
            Image.open(src).save(root / f"{isic_id}.png")
        else:
            shutil.copy(src, root / f"{isic_id}{ext}")
    df = pd.DataFrame(rows)
    cols = ["isic_id", "attribution", "copyright_license"] + sorted(c for c in df.columns if c not in
                                                                     ("isic_id", "attribution", "copyright_license"))
    df[cols].to_csv(root / "metadata.csv", index=False)
    (root / "attribution.txt").write_text("Hospital A\n\nAnonymous")
    (root / "licenses").mkdir()
    for lic in ("CC-BY", "CC-0", "CC-BY-NC"):
        (root / "licenses" / f"{lic}.txt").write_text(lic)
    return df


def samples(shards: Path) -> dict[str, dict]:
    """Every sample's json field, by key, read back from the tars."""
    out = {}
    for tar in shards.glob("fold-*/*.tar"):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    out[m.name[:-5]] = json.loads(t.extractfile(m).read())
    return out


def test_archive_download_folder(synth_data, tmp_path):
    src = write_archive(tmp_path / "isic-download", synth_images(synth_data)[:40]).set_index("isic_id")
    out = tmp_path / "shards"
    assert shards_main(["build", "--csv", str(tmp_path / "isic-download"), "--out", str(out), "--num-folds", "2",
                        "--max-side", "0", "--quiet"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert verify(out, progress=False) == []
    assert m["sources"][0]["kind"] == "archive" and m["sources"][0]["name"] == "archive:isic-download"
    skipped = {s["image_name"]: s["reason"] for s in m["skipped"]}
    assert skipped["ISIC_9000005"].startswith("indeterminate diagnosis")
    assert skipped["ISIC_9000007"].startswith("no diagnosis")
    got = samples(out)
    assert len(got) == 38 == m["totals"]["samples"]
    for name, s in got.items():
        i = int(name[-2:])
        row = src.loc[name]
        assert s["target"] == int(row["diagnosis_2"] == MEL[1])  # BCC (i == 6) is malignant, not melanoma
        assert s["site"] == SITES[i % len(SITES)][2], name
        assert s["copyright_license"] == row["copyright_license"] and s["attribution"] == row["attribution"]
        assert s["fitzpatrick_skin_type"] == row["fitzpatrick_skin_type"]
        # patient: patient_id, else lesion_id, else the image itself (blank and -1 are unknown)
        expect = row["patient_id"] if row["patient_id"] not in ("", "-1") else (row["lesion_id"] or name)
        assert s["patient_id"] == expect
    assert sum(s["target"] for s in got.values()) == 10 and got["ISIC_9000006"]["target"] == 0
    converted = {c["image_name"] for c in m["converted"]}
    assert converted == {n for n in got if int(n[-2:]) % 3 == 2}  # the .png files, re-encoded as JPEG
    assert m["licenses"] == dict(sorted(pd.Series([s["copyright_license"] for s in got.values()])
                                        .value_counts().items()))
    # unknown patients are never one group: every image without an id is a group of its own
    folds = pd.read_csv(out / "folds.csv", keep_default_na=False)
    unknown = folds[folds["image_name"].map(lambda n: src.loc[n, "patient_id"] in ("", "-1")
                                            and not src.loc[n, "lesion_id"])]
    assert len(unknown) > 3 and unknown["group"].is_unique


def write_isic2024(root: Path, images: list[Path]) -> pd.DataFrame:
    """ISIC 2024 train-metadata.csv + train-image.hdf5 (JPEG bytes per isic_id, as Kaggle ships it)."""
    root.mkdir(parents=True)
    rows = []
    with h5py.File(root / "train-image.hdf5", "w") as f:
        for i, src in enumerate(images):
            isic_id = f"ISIC_{8000000 + i:07d}"
            if i != 3:  # one image missing from the HDF5 file
                f.create_dataset(isic_id, data=np.bytes_(src.read_bytes()))
            diag = (MEL if i % 10 == 0 else BCC) if i % 5 == 0 else NEVUS  # target: malignant, not melanoma
            rows.append({"isic_id": isic_id, "target": int(i % 5 == 0), "patient_id": f"IP_{i // 2:07d}",
                         **{f"iddx_{k + 1}": (diag[k] if k < len(diag) else "") for k in range(5)},
                         "age_approx": 40 + i % 30, "sex": ["male", "female"][i % 2],
                         "anatom_site_general": ["posterior torso", "lower extremity", "head/neck",
                                                 "anterior torso", "upper extremity"][i % 5],
                         "lesion_id": "", "tbp_tile_type": "3D: XP",
                         "attribution": "Memorial Sloan Kettering Cancer Center", "copyright_license": "CC-BY-NC"})
    df = pd.DataFrame(rows)
    df.to_csv(root / "train-metadata.csv", index=False)
    return df


def test_isic2024_with_hdf5(synth_data, tmp_path):
    src = write_isic2024(tmp_path / "isic2024", synth_images(synth_data)[:30]).set_index("isic_id")
    out = tmp_path / "shards"
    m = build(tmp_path / "isic2024" / "train-metadata.csv", None, out, OPTS, progress=False)
    assert verify(out, progress=False) == []
    assert m["sources"][0]["kind"] == "isic2024" and m["sources"][0]["images"].endswith("train-image.hdf5")
    assert {s["image_name"]: s["reason"] for s in m["skipped"]}["ISIC_8000003"].startswith("missing image ISIC_8000003")
    got = samples(out)
    assert len(got) == 29 and sum(s["target"] for s in got.values()) == 3
    assert sum(src.loc[n, "target"] for n in got) == 6  # 3 of the 6 malignant lesions are carcinomas
    site = {"posterior torso": "torso", "anterior torso": "torso"}
    for name, s in got.items():  # melanoma from the iddx hierarchy; the CSV's target (malignant) is not it
        assert s["target"] == int(src.loc[name, "iddx_2"] == MEL[1]) and s["patient_id"] == src.loc[name, "patient_id"]
        assert s["site"] == site.get(src.loc[name, "anatom_site_general"], src.loc[name, "anatom_site_general"])
    # the stored JPEG is the HDF5 file's bytes
    with tarfile.open(next(out.glob("fold-*/*.tar"))) as t:
        member = next(x for x in t.getmembers() if x.name.endswith(".jpg"))
        raw = t.extractfile(member).read()
    with h5py.File(tmp_path / "isic2024" / "train-image.hdf5") as f:
        assert raw == f[member.name[:-4]][()].tobytes()


def write_2019_2020(root: Path, images: list[Path]) -> None:
    """ISIC 2020 train.csv (images 0..29) and an ISIC 2019 ground truth + metadata (images 30..49) with
    planted duplicates of 2020 images: an exact copy and a resized, re-encoded copy under 2019 names, the
    near copy's lesion shared with another 2019 image; and 2019 rows with unknown lesion ids."""
    (root / "2020" / "jpeg").mkdir(parents=True)
    (root / "2019" / "img").mkdir(parents=True)
    rows = []
    for i, p in enumerate(images[:30]):
        name = f"ISIC_{7000000 + i:07d}"
        shutil.copy(p, root / "2020" / "jpeg" / f"{name}.jpg")
        rows.append({"image_name": name, "patient_id": f"IP_{i // 3:07d}", "sex": "male", "age_approx": 50,
                     "anatom_site_general_challenge": "torso", "diagnosis": "nevus", "benign_malignant": "benign",
                     "target": int(i % 4 == 0)})
    pd.DataFrame(rows).to_csv(root / "2020" / "train.csv", index=False)
    gt, meta = [], []
    for i, p in enumerate(images[30:50]):
        name = f"ISIC_{6000000 + i:07d}"
        shutil.copy(p, root / "2019" / "img" / f"{name}.jpg")
        mel = float(i % 3 == 0)
        gt.append({"image": name, "MEL": mel, "NV": 1 - mel, "BCC": 0.0})
        meta.append({"image": name, "age_approx": 40, "anatom_site_general": "anterior torso",
                     "lesion_id": "" if i % 4 == 1 else f"BCN_{i:07d}", "sex": "female"})
    exact, near = images[4], images[8]  # 2020 ISIC_7000004 (target 1) and ISIC_7000008 (target 1)
    shutil.copy(exact, root / "2019" / "img" / "ISIC_6100000.jpg")
    im = Image.open(near)
    im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.Resampling.LANCZOS).save(
        root / "2019" / "img" / "ISIC_6100001.jpg", quality=85)
    gt += [{"image": "ISIC_6100000", "MEL": 1.0, "NV": 0.0, "BCC": 0.0},
           {"image": "ISIC_6100001", "MEL": 0.0, "NV": 1.0, "BCC": 0.0}]  # the near copy disagrees on the label
    meta += [{"image": "ISIC_6100000", "age_approx": 50, "anatom_site_general": "torso", "lesion_id": "",
              "sex": "male"},
             {"image": "ISIC_6100001", "age_approx": 50, "anatom_site_general": "torso", "lesion_id": "BCN_0000002",
              "sex": "male"}]  # BCN_0000002 is also the lesion of 2019 image ISIC_6000002
    pd.DataFrame(gt).to_csv(root / "2019" / "ISIC_2019_Training_GroundTruth.csv", index=False)
    pd.DataFrame(meta).to_csv(root / "2019" / "ISIC_2019_Training_Metadata.csv", index=False)
    pd.DataFrame({"image_name_1": ["ISIC_7000000"], "image_name_2": ["ISIC_7000001"]}).to_csv(
        root / "2020" / "ISIC_2020_Training_Duplicates.csv", index=False)


@pytest.fixture(scope="module")
def merged(synth_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merged")
    write_2019_2020(root, synth_images(synth_data))
    out = root / "shards"
    rc = shards_main(["build", "--csv", str(root / "2020" / "train.csv"), "--images", str(root / "2020" / "jpeg"),
                      "--csv", str(root / "2019" / "ISIC_2019_Training_GroundTruth.csv"),
                      "--images", str(root / "2019" / "img"),
                      "--exclude", str(root / "2020" / "ISIC_2020_Training_Duplicates.csv"),
                      "--out", str(out), "--num-folds", "2", "--samples-per-shard", "16", "--max-side", "0",
                      "--quiet"])
    assert rc == 0
    return out


def test_merged_2019_2020_duplicates_found_kept_once_same_fold(merged):
    m = json.loads((merged / "manifest.json").read_text())
    assert verify(merged, progress=False) == []
    assert [s["name"] for s in m["sources"]] == ["isic2020", "isic2019"]
    pairs = {(p["a"], p["b"]): p for p in m["duplicates"]["pairs"]}
    assert pairs[("ISIC_6100000", "ISIC_7000004")]["kind"] == "exact"
    near = pairs[("ISIC_6100001", "ISIC_7000008")]
    assert near["kind"] == "near" and 0 < near["distance"] <= m["options"]["dup_distance"]
    assert len(pairs) == 2  # no false positives among the 48 other synthetic lesions
    dropped = {d["dropped"]: d for d in m["duplicates"]["dropped"]}
    assert set(dropped) == {"ISIC_6100000", "ISIC_6100001"}  # the earlier --csv source (2020) keeps its copy
    assert dropped["ISIC_6100001"]["kept"] == "ISIC_7000008" and dropped["ISIC_6100001"]["label_conflict"]
    assert not dropped["ISIC_6100000"]["label_conflict"]
    reasons = {s["image_name"]: s["reason"] for s in m["skipped"]}
    assert reasons["ISIC_7000001"].startswith("excluded") and reasons["ISIC_6100001"].startswith("duplicate")
    folds = pd.read_csv(merged / "folds.csv", keep_default_na=False).set_index("image_name")
    assert len(folds) == 50 - 1 == m["totals"]["samples"]  # 52 rows − 2 duplicates − 1 excluded
    assert m["per_source"] == {"isic2020": {"samples": 29, "positives": int(folds["target"][folds["source"] == "isic2020"].sum())},
                               "isic2019": {"samples": 20, "positives": 7}}
    # the near copy's lesion links 2019 image ISIC_6000002 to the 2020 patient of ISIC_7000008: one group, one fold
    assert folds.loc["ISIC_6000002", "group"] == folds.loc["ISIC_7000008", "group"]
    assert folds.loc["ISIC_6000002", "fold"] == folds.loc["ISIC_7000008", "fold"]
    # no group spans two folds; 2019 rows without a lesion id are groups of their own
    assert (folds.groupby("group")["fold"].nunique() == 1).all()
    alone = [f"ISIC_{6000000 + i:07d}" for i in range(20) if i % 4 == 1]
    assert folds.loc[alone, "group"].is_unique and set(folds.loc[alone, "group"]) == set(alone)


def test_build_input_errors(merged, tmp_path):
    root = merged.parent
    with pytest.raises(ValueError, match="2 --csv but 1 --images"):
        build([root / "2020" / "train.csv", root / "2019" / "ISIC_2019_Training_GroundTruth.csv"],
              [root / "2020" / "jpeg"], tmp_path / "x", OPTS, progress=False)
    with pytest.raises(ValueError, match="needs --images"):
        build(root / "2020" / "train.csv", None, tmp_path / "x", OPTS, progress=False)
    (tmp_path / "odd.csv").write_text("name,label\na,1\n")
    with pytest.raises(ValueError, match=r"not a layout zoome-shards reads.*isic2024"):
        build(tmp_path / "odd.csv", root / "2020" / "jpeg", tmp_path / "x", OPTS, progress=False)
    with pytest.raises(ValueError, match="--dup-distance must lie in -1..64"):
        build(root / "2020" / "train.csv", root / "2020" / "jpeg", tmp_path / "x",
              BuildOptions(folds=2, dup_distance=99), progress=False)


@pytest.mark.slow
def test_per_source_and_subgroup_metrics_of_a_training_run(merged, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "zoome", "backbone": "resnet18", "pool_size": 2},
                                   "data": {"image_size": 32, "num_threads": 1},
                                   "train": {"epochs": 1, "global_batch_size": 8, "micro_batch_size": 8,
                                             "precision": "fp32"}}))
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "zoome_dist.train", "--config", str(cfg), "--shards", str(merged),
                        "--fold", "0", "--out", str(run), "--no-progress"], capture_output=True, text=True,
                       timeout=600, cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    preds = pd.read_csv(run / "predictions_last.csv", keep_default_na=False, na_values=[""])
    assert set(preds["source"]) == {"isic2019", "isic2020"} and {"sex", "age_approx", "site"} <= set(preds.columns)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for src, part in preds.groupby("source"):
        expect = roc_auc_score(part["target"], part["prob"]) if 0 < part["target"].sum() < len(part) else None
        got = record["val_auc_by_source"][src]
        assert (np.isnan(got) if expect is None else got == pytest.approx(expect, abs=1e-9))
    assert (run / "calibration.png").read_bytes()[:4] == b"\x89PNG" and 0 <= record["val_ece"] <= 1
    groups = pd.read_csv(run / "subgroups.csv", keep_default_na=False, na_values=[""])
    by = groups.set_index(["subgroup", "value"])
    assert by.loc[("source", "isic2019"), "n"] == (preds["source"] == "isic2019").sum()
    assert by.loc[("sex", "female"), "positives"] == preds["target"][preds["sex"] == "female"].sum()
    assert groups[groups["subgroup"] == "source"]["n"].sum() == len(preds)


def test_subgroup_metrics_counts_and_bands():
    preds = pd.DataFrame({"target": [0, 1, 0, 1, 0, 0], "prob": [0.1, 0.9, 0.8, 0.7, 0.2, 0.3],
                          "sex": ["male", "male", "female", "female", "", "male"],
                          "age_approx": [25, 50, np.nan, 80, 44, 30], "source": ["a"] * 6,
                          "fitzpatrick_skin_type": ["", "", "", "", "", ""]})
    t = subgroup_metrics(preds).set_index(["subgroup", "value"])
    assert t.loc[("sex", "male"), "auc"] == pytest.approx(roc_auc_score([0, 1, 0], [0.1, 0.9, 0.3]))
    assert np.isnan(t.loc[("sex", "unknown"), "auc"]) and t.loc[("sex", "unknown"), "n"] == 1
    assert t.loc[("age", "30-44"), "n"] == 2 and t.loc[("age", "unknown"), "n"] == 1
    assert t.loc[("age", "75+"), "positives"] == 1
    assert "fitzpatrick_skin_type" not in t.index.get_level_values(0)  # absent from this data


@pytest.fixture(scope="module")
def no_meta_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = load_config(overrides={"model.name": "zoome_no_meta", "model.backbone": "resnet18", "model.pool_size": 2,
                                 "data.image_size": 48})
    run = tmp_path_factory.mktemp("nometa")
    save_model(run / "model_last.pt", cfg, build_model(cfg), ENC.to_dict(), 0, {"auc": 0.5})
    return run


def test_predict_on_a_folder_without_csv(no_meta_checkpoint, synth_data, tmp_path, capsys):
    folder = tmp_path / "new"
    folder.mkdir()
    imgs = synth_images(synth_data)[:7]
    for i, p in enumerate(imgs):  # mixed extensions, PNG among them
        if i % 3 == 2:
            Image.open(p).save(folder / f"lesion_{i}.png")
        else:
            shutil.copy(p, folder / f"lesion_{i}{'.JPG' if i % 3 else '.jpg'}")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "pred.csv"
    assert zoome_main(["predict", "--checkpoint", str(no_meta_checkpoint), "--images", str(folder), "--out", str(out),
                       "--batch-size", "3"]) == 0
    pred = pd.read_csv(out)
    assert list(pred["image_name"]) == [f"lesion_{i}" for i in range(7)] and pred["target"].between(0, 1).all()
    assert "warning" not in capsys.readouterr().err  # a model without metadata needs none
    # each image scored alone, from its own bytes, gives the same probability
    member = load_member(no_meta_checkpoint / "model_last.pt", torch.device("cpu"))
    for i in (0, 2):
        one = tmp_path / f"one{i}"
        one.mkdir()
        src = next(folder.glob(f"lesion_{i}.*"))
        shutil.copy(src, one / src.name)
        alone, _ = predict([member], None, one)
        assert alone["prob"].iloc[0] == pytest.approx(pred["target"].iloc[i], abs=1e-6)


def test_predict_on_an_archive_folder_uses_its_metadata(synth_data, tmp_path, capsys):
    torch.manual_seed(0)
    cfg = load_config(overrides={"model.backbone": "resnet18", "model.pool_size": 2, "data.image_size": 48})
    ckpt = tmp_path / "model_best.pt"
    save_model(ckpt, cfg, build_model(cfg), ENC.to_dict(), 0, {"auc": 0.5})
    src = write_archive(tmp_path / "dl", synth_images(synth_data)[:6])
    member = load_member(ckpt, torch.device("cpu"))
    with_meta, problems = predict([member], None, tmp_path / "dl")
    assert list(with_meta["image_name"]) == list(src["isic_id"]) and problems == []
    # a metadata.csv that lists only some images, one of them twice: each image scored once or named
    part = pd.read_csv(tmp_path / "dl" / "metadata.csv", dtype=str, keep_default_na=False)
    part.iloc[[0, 1, 0, 2]].to_csv(tmp_path / "dl" / "metadata.csv", index=False)
    some, problems = predict([member], None, tmp_path / "dl")
    assert list(some["image_name"]) == list(src["isic_id"][:3])
    reasons = {p["image_name"]: p["reason"] for p in problems}
    assert sorted(reasons) == sorted([src["isic_id"][0], *src["isic_id"][3:]])
    assert "listed again" in reasons[src["isic_id"][0]]
    assert all("not listed" in reasons[n] for n in src["isic_id"][3:])
    (tmp_path / "dl" / "metadata.csv").unlink()
    without, _ = predict([member], None, tmp_path / "dl")
    assert "age, sex and site unknown" in capsys.readouterr().err
    assert list(without["image_name"]) == sorted(src["isic_id"])
    assert not np.allclose(with_meta["prob"], without["prob"])  # the metadata reached the model


def test_png_copy_of_a_jpeg_is_an_exact_phash_match(synth_data, tmp_path):
    """The near-duplicate rule's basis: a PNG re-save hashes 0 bits apart, a resized copy a few bits."""
    from zoome_dist.data.dedup import digest
    from zoome_dist.data.sources import FolderImages

    src = synth_images(synth_data)[0]
    Image.open(src).save(tmp_path / "a.png")
    im = Image.open(src)
    buf = io.BytesIO()
    im.resize((im.width // 2, im.height // 2)).save(buf, "JPEG", quality=80)
    (tmp_path / "b.jpg").write_bytes(buf.getvalue())
    shutil.copy(src, tmp_path / "c.jpg")
    store = FolderImages(tmp_path)
    h = {n: int(digest(store, n)[1], 16) for n in "abc"}
    assert bin(h["a"] ^ h["c"]).count("1") == 0
    assert bin(h["b"] ^ h["c"]).count("1") <= BuildOptions().dup_distance


def test_keep_rule_chain_empty_source_and_uncertain_diagnoses(merged, tmp_path):
    from zoome_dist.data.archive import archive_target
    from zoome_dist.data.dedup import resolve

    # a chain A~B~C whose ends are not duplicates: A kept, B dropped (a copy of A), C kept
    table = pd.DataFrame({"image_name": ["A", "B", "C"], "source": ["s"] * 3, "target": [0, 0, 1]})
    keep, _, dropped, largest = resolve(table, [(0, 1, "near", 5), (1, 2, "near", 6)], {"s": 0})
    assert list(keep) == [True, False, True] and [d["kept"] for d in dropped] == ["A"] and largest == 3
    # labels the hierarchy cannot decide are skipped, not called benign
    assert archive_target({"diagnosis_1": "Malignant"})[0] is None
    assert archive_target({"diagnosis": "unknown", "benign_malignant": "malignant"})[0] is None
    assert archive_target({"diagnosis": "unknown", "benign_malignant": "benign"})[0] == 0
    assert archive_target({"diagnosis": "melanoma"})[0] == 1
    # a source left without any usable row: the build goes on, and says the source gave nothing
    root = merged.parent
    dl = tmp_path / "dl"
    dl.mkdir()
    pd.DataFrame([{"isic_id": "ISIC_5000000", "attribution": "A", "copyright_license": "CC-0",
                   "diagnosis_1": "Indeterminate"}]).to_csv(dl / "metadata.csv", index=False)
    m = build([root / "2020" / "train.csv", dl], [root / "2020" / "jpeg", dl], tmp_path / "out", OPTS, progress=False)
    assert m["per_source"]["archive:dl"] == {"samples": 0, "positives": 0} and m["totals"]["samples"] == 30


@pytest.mark.parametrize("rec, target", [
    ({"diagnosis": "melanoma metastasis", "benign_malignant": "malignant"}, 1),  # the older flat vocabulary
    ({"diagnosis": "Melanoma in situ"}, 1),
    ({"diagnosis": "melanoma"}, 1),
    ({"diagnosis": "basal cell carcinoma", "benign_malignant": "malignant"}, 0),  # malignant, not melanoma
    ({"diagnosis": "nevus", "benign_malignant": "benign"}, 0),
    ({"diagnosis": "nevus", "benign_malignant": "malignant"}, None),  # contradictory: skipped with its reason
    ({"diagnosis": "atypical melanocytic proliferation"}, None),
    ({"diagnosis": "", "benign_malignant": "malignant"}, None),
    ({"diagnosis": "melanoma", "benign_malignant": "benign"}, None),  # contradictory
    ({"diagnosis": "unknown", "benign_malignant": "benign"}, 0),
    ({"diagnosis": "other"}, None),
    ({"diagnosis": "solar lentigo", "benign_malignant": "benign"}, 0),
    ({"diagnosis": "squamous cell carcinoma", "benign_malignant": "malignant"}, 0),
    ({"diagnosis": "atypical spitz tumor"}, None),
    ({"diagnosis": "dysplastic thing"}, None),  # not in the vocabulary: skipped, never a 0
    # the hierarchy (today's downloads, ISIC 2024's iddx_*)
    ({"diagnosis_1": "Benign", "diagnosis_2": "Benign melanocytic proliferations"}, 0),
    ({"diagnosis_1": "Malignant", "diagnosis_2": "Malignant melanocytic proliferations (Melanoma)"}, 1),
    ({"diagnosis_1": "Malignant", "diagnosis_2": "Malignant epidermal proliferations"}, 0),
    ({"diagnosis_1": "Indeterminate", "diagnosis_2": "Indeterminate melanocytic proliferations"}, None),
    ({"diagnosis_1": "Probably benign"}, None),  # not a level-1 value
])
def test_flat_archive_vocabulary_labels(rec, target):
    from zoome_dist.data.archive import archive_target

    got, _, reason = archive_target(rec)
    assert got == target and (reason != "") == (target is None), (rec, got, reason)


def test_hdf5_dataset_declaring_a_huge_size_is_skipped_not_read(tmp_path):
    """A 1 TiB dataset declared in a small file (chunked, nothing written): a skip with its reason, no
    memory blow-up."""
    from zoome_dist.data.images import BadImage
    from zoome_dist.data.sources import HDF5Images

    path = tmp_path / "x.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("ISIC_0000001", shape=(1 << 40,), dtype="u1", chunks=(1 << 16,))
        f.create_dataset("ISIC_0000002", data=np.frombuffer(b"\xff\xd8 small", dtype="u1"))
    assert path.stat().st_size < 1 << 20
    store = HDF5Images(path)
    with pytest.raises(BadImage, match=r"declares 1,099,511,627,776 bytes, more than an image"):
        store.read("ISIC_0000001")
    assert store.read("ISIC_0000002") == b"\xff\xd8 small"
