"""Shard builder on real tar files: round trip, folds, determinism, resume, bad input, verify."""
from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SHARD_OPTS
from PIL import Image

from zoome_dist.cli.shards import main as shards_main
from zoome_dist.data.isic import read_isic
from zoome_dist.data.manifest import load_manifest, verify
from zoome_dist.data.metadata import MetadataEncoding
from zoome_dist.data.synth import synthesize
from zoome_dist.data.writer import BuildOptions, build

ROOT = Path(__file__).resolve().parents[1]


def read_samples(shards: Path) -> dict[str, dict]:
    """Every sample of every shard: key → fields (+ the fold and shard it sits in)."""
    manifest = load_manifest(shards)
    out: dict[str, dict] = {}
    for fold in manifest["folds"]:
        for s in fold["shards"]:
            with tarfile.open(shards / s["path"]) as tf:
                for m in tf:
                    key, _, ext = m.name.partition(".")
                    rec = out.setdefault(key, {"fold": fold["fold"], "shard": s["path"]})
                    if rec["shard"] != s["path"]:
                        raise AssertionError(f"{key} appears in {rec['shard']} and {s['path']}")
                    rec[ext] = tf.extractfile(m).read()
    return out


def shard_hashes(shards: Path) -> dict[str, str]:
    m = load_manifest(shards)
    hashes = {s["path"]: s["sha256"] for f in m["folds"] for s in f["shards"]}
    hashes.update({s["index"]: (shards / s["index"]).read_text() for f in m["folds"] for s in f["shards"]})
    return hashes


def test_round_trip(synth_data, shards_dir):
    csv = pd.read_csv(synth_data / "train.csv", keep_default_na=False, dtype=str)
    samples = read_samples(shards_dir)
    assert sorted(samples) == sorted(csv["image_name"])
    enc = MetadataEncoding.from_dict(load_manifest(shards_dir)["metadata_encoding"])
    folds = pd.read_csv(shards_dir / "folds.csv")
    for row in csv.to_dict("records"):
        s = samples[row["image_name"]]
        assert s["jpg"] == (synth_data / "jpeg" / "train" / f"{row['image_name']}.jpg").read_bytes()
        assert int(np.frombuffer(s["label"], "<i4")[0]) == int(row["target"]) == int(s["cls"])
        expect = enc.encode(row["age_approx"], row["sex"], row["anatom_site_general_challenge"])
        np.testing.assert_array_equal(np.frombuffer(s["meta"], "<f4"), expect)
        info = json.loads(s["json"])
        assert info["patient_id"] == row["patient_id"] and info["target"] == int(row["target"])
        sid = int(np.frombuffer(s["sid"], "<i8")[0])
        frow = folds[folds["sample_id"] == sid].iloc[0]
        assert frow["image_name"] == row["image_name"] and frow["fold"] == s["fold"]
        assert frow["shard"] == s["shard"]


def test_fold_invariants(shards_dir):
    folds = pd.read_csv(shards_dir / "folds.csv")
    assert folds.groupby("patient_id")["fold"].nunique().max() == 1, "a patient spans two folds"
    manifest = load_manifest(shards_dir)
    assert len(manifest["folds"]) == SHARD_OPTS.folds
    pos = [f["positives"] for f in manifest["folds"]]
    per_patient_max = folds.groupby("patient_id")["target"].sum().max()
    assert max(pos) - min(pos) <= max(2, per_patient_max), pos
    for f in manifest["folds"]:
        part = folds[folds["fold"] == f["fold"]]
        assert f["samples"] == len(part) and f["positives"] == part["target"].sum()
        assert f["patients"] == part["patient_id"].nunique()
        assert all(s["samples"] <= SHARD_OPTS.samples_per_shard for s in f["shards"])
    # rows are shuffled within the fold when written, not left in CSV order
    first = [n for n in folds[folds["fold"] == 0].sort_values("shard")["image_name"]]
    order = list(read_samples(shards_dir))
    assert [n for n in order if n in set(first)] != sorted(first)


def test_deterministic_and_worker_independent(synth_data, shards_dir, tmp_path):
    build(synth_data / "train.csv", synth_data / "jpeg" / "train", tmp_path / "again", SHARD_OPTS,
          workers=2, progress=False)
    assert shard_hashes(tmp_path / "again") == shard_hashes(shards_dir)
    assert (tmp_path / "again" / "folds.csv").read_bytes() == (shards_dir / "folds.csv").read_bytes()


@pytest.mark.parametrize("changed", [False, True], ids=["same-images", "an-image-changed"])
def test_interrupted_hashing_keeps_what_it_hashed(synth_data, shards_dir, tmp_path, monkeypatch, changed):
    """Ctrl-C during the duplicate search's hashing pass: the digests hashed so far are saved, and a
    plain re-run hashes only the rest (and an image changed in between), with the same digests and
    folds as an uninterrupted build."""
    from zoome_dist.data import dedup

    real, hashed, interrupted = dedup.digest, [], []

    def digest(store, name):
        hashed.append(name)
        if len(hashed) == 30 and not interrupted:
            interrupted.append(name)
            raise KeyboardInterrupt
        return real(store, name)

    monkeypatch.setattr(dedup, "digest", digest)
    images, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(synth_data / "jpeg" / "train", images)
    with pytest.raises(KeyboardInterrupt):
        build(synth_data / "train.csv", images, out, SHARD_OPTS, progress=False)
    assert len(json.loads((out / ".build" / "digests.json").read_text())["digests"]) == 29
    first = hashed[0]
    if changed:
        Image.open(images / f"{first}.jpg").save(images / f"{first}.jpg", quality=60)
    hashed.clear()  # the folder holds only the lock and the digests: a plain re-run continues
    build(synth_data / "train.csv", images, out, SHARD_OPTS, progress=False)
    assert len(hashed) == len(pd.read_csv(synth_data / "train.csv")) - 29 + changed
    assert (first in hashed) == changed
    got = json.loads((out / ".build" / "digests.json").read_text())["digests"]
    want = json.loads((shards_dir / ".build" / "digests.json").read_text())["digests"]
    assert got.keys() == want.keys()
    assert [k for k in got if got[k] != want[k]] == ([next(k for k in got if k.endswith(first))] if changed else [])
    if not changed:
        assert (out / "folds.csv").read_bytes() == (shards_dir / "folds.csv").read_bytes()


def test_nonempty_out_needs_resume(synth_data, shards_dir):
    with pytest.raises(FileExistsError, match="--resume"):
        build(synth_data / "train.csv", synth_data / "jpeg" / "train", shards_dir, SHARD_OPTS, progress=False)
    other = BuildOptions(folds=3, seed=1, max_side=0, samples_per_shard=12)
    with pytest.raises(ValueError, match="other inputs or options"):
        build(synth_data / "train.csv", synth_data / "jpeg" / "train", shards_dir, other, resume=True,
              progress=False)


@pytest.mark.slow
def test_resume_after_kill(synth_data, shards_dir, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "zoome_dist.cli.shards", "build", "--csv", str(synth_data / "train.csv"),
           "--images", str(synth_data / "jpeg" / "train"), "--out", str(out), "--num-folds", "3",
           "--max-side", "0", "--quiet"]
    # Tiny shards so the build is still running when it is killed.
    proc = subprocess.Popen(cmd + ["--samples-per-shard", "2"], cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / ".build").glob("fold-*.json"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted((out / ".build").glob("fold-*.json"))
    assert 3 <= len(done) < 48, "the build must be killed mid-way"
    assert not (out / "manifest.json").exists()
    finished = {}
    for rec in done:
        r = json.loads(rec.read_text())
        finished[r["path"]] = (out / r["path"]).stat().st_mtime_ns
    rc = subprocess.run(cmd + ["--samples-per-shard", "2", "--resume"], cwd=ROOT).returncode
    assert rc == 0
    for path, mtime in finished.items():
        assert (out / path).stat().st_mtime_ns == mtime, f"{path} was rewritten on resume"
    assert not list(out.rglob("*.tmp"))
    fresh = tmp_path / "fresh"
    build(synth_data / "train.csv", synth_data / "jpeg" / "train", fresh,
          BuildOptions(folds=3, seed=0, max_side=0, samples_per_shard=2), progress=False)
    assert shard_hashes(out) == shard_hashes(fresh)
    assert verify(out, progress=False) == []


def _bad_dataset(root: Path) -> Path:
    """A small ISIC-2020 CSV + images with one example of every kind of bad input."""
    synthesize(root, 24, seed=5, prevalence=0.3, size=48, progress=False)
    img = root / "jpeg" / "train"
    csv = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    (img / "SYN_0000001.jpg").unlink()                                       # missing
    raw = (img / "SYN_0000002.jpg").read_bytes()
    (img / "SYN_0000002.jpg").write_bytes(raw[: len(raw) // 2])              # truncated
    (img / "SYN_0000003.jpg").write_bytes(b"not an image at all")           # corrupt
    Image.open(img / "SYN_0000004.jpg").save(img / "SYN_0000004.jpg", format="PNG")       # PNG
    Image.open(img / "SYN_0000005.jpg").convert("L").save(img / "SYN_0000005.jpg", format="JPEG")
    Image.open(img / "SYN_0000006.jpg").convert("CMYK").save(img / "SYN_0000006.jpg", format="JPEG")
    csv.loc[7, "anatom_site_general_challenge"] = "left elbow"                # unknown site
    csv.loc[8, "image_name"] = "../../etc/passwd"                             # escapes the folder
    csv.loc[9, "target"] = "maybe"                                            # bad target
    csv.loc[10, "age_approx"] = "old"                                         # malformed age
    raw = (img / "SYN_0000011.jpg").read_bytes()                              # truncated, re-terminated
    (img / "SYN_0000011.jpg").write_bytes(raw[: int(len(raw) * 0.6)] + b"\xff\xd9")
    raw = bytearray((img / "SYN_0000012.jpg").read_bytes())                   # header promises 4x the rows
    sof = raw.find(b"\xff\xc0")
    raw[sof + 5:sof + 7] = (int.from_bytes(raw[sof + 5:sof + 7], "big") * 4).to_bytes(2, "big")
    (img / "SYN_0000012.jpg").write_bytes(bytes(raw))
    lines = csv.to_csv(index=False).splitlines()
    lines[14] = ",".join(lines[14].split(",")[:3])                            # too few fields (SYN_0000013)
    text = "\n".join(lines) + "\nSYN_9999999,P,male,40,torso,nevus,benign,0,EXTRA,FIELDS\n"
    (root / "train.csv").write_text(text)
    return root


def test_bad_input_is_skipped_converted_and_recorded(tmp_path, capsys):
    root = _bad_dataset(tmp_path / "bad")
    rc = shards_main(["build", "--csv", str(root / "train.csv"), "--images", str(root / "jpeg" / "train"),
                      "--out", str(tmp_path / "out"), "--num-folds", "2", "--samples-per-shard", "5", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    m = load_manifest(tmp_path / "out")
    skipped = {s["image_name"]: s["reason"] for s in m["skipped"]}
    assert "missing image file" in skipped["SYN_0000001"]
    assert "cannot decode" in skipped["SYN_0000002"] and "cannot decode" in skipped["SYN_0000003"]
    assert "unsafe image name" in skipped["../../etc/passwd"]
    assert "invalid target" in skipped["SYN_0000009"]
    assert "malformed age_approx" in skipped["SYN_0000010"]
    assert any("malformed CSV row" in r for r in skipped.values())
    assert "damaged JPEG" in skipped["SYN_0000011"] and "premature end" in skipped["SYN_0000011"]
    assert "damaged JPEG" in skipped["SYN_0000012"]
    assert "malformed CSV row" in skipped["SYN_0000013"] and "3 fields" in skipped["SYN_0000013"]
    assert not any(" at 0x" in r or "<" in r for r in skipped.values()), "object repr in a skip reason"
    converted = {c["image_name"]: c["reason"] for c in m["converted"]}
    assert "PNG file under .jpg" in converted["SYN_0000004"]
    assert "L image converted to RGB" in converted["SYN_0000005"]
    assert "CMYK image converted to RGB" in converted["SYN_0000006"]
    assert m["unknown_sites"] == {"left elbow": 1}
    assert m["totals"]["samples"] == 24 - 9 and m["totals"]["skipped"] == len(skipped)
    samples = read_samples(tmp_path / "out")
    bad = (1, 2, 3, 8, 9, 10, 11, 12, 13)
    assert set(samples) == {f"SYN_{i:07d}" for i in range(24)} - {f"SYN_{i:07d}" for i in bad}
    rc = shards_main(["build", "--csv", str(root / "train.csv"), "--images", str(root / "jpeg" / "train"),
                      "--out", str(tmp_path / "again"), "--num-folds", "2", "--samples-per-shard", "5", "--quiet"])
    assert rc == 0 and load_manifest(tmp_path / "again")["skipped"] == m["skipped"]
    for name in converted:
        im = Image.open(io.BytesIO(samples[name]["jpg"]))
        assert (im.format, im.mode) == ("JPEG", "RGB")
    assert "skipped" in printed and "converted" in printed and "left elbow" in printed


def test_strict_names_first_bad_sample(tmp_path, capsys):
    root = _bad_dataset(tmp_path / "bad")
    rc = shards_main(["build", "--csv", str(root / "train.csv"), "--images", str(root / "jpeg" / "train"),
                      "--out", str(tmp_path / "out"), "--num-folds", "2", "--strict", "--quiet"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "bad row 'SYN_9999999'" in err and "malformed CSV row" in err
    # with the CSV clean, strict stops at the first bad image instead
    csv = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False, on_bad_lines="skip").iloc[:8]
    csv = csv[csv["image_name"] != "SYN_0000000"]
    csv.to_csv(root / "clean.csv", index=False)
    rc = shards_main(["build", "--csv", str(root / "clean.csv"), "--images", str(root / "jpeg" / "train"),
                      "--out", str(tmp_path / "out2"), "--num-folds", "2", "--strict", "--quiet"])
    assert rc != 0
    assert "bad sample SYN_000000" in capsys.readouterr().err


def test_csv_errors(tmp_path):
    (tmp_path / "a.csv").write_text("image_name,target\nx,0\n")
    with pytest.raises(ValueError, match=r"a\.csv: missing required column\(s\) \['patient_id'"):
        read_isic(tmp_path / "a.csv")
    header = "image_name,patient_id,sex,age_approx,anatom_site_general_challenge,target\n"
    (tmp_path / "b.csv").write_text(header + "X_1,P1,male,40,torso,0\nX_1,P2,female,50,torso,1\n")
    with pytest.raises(ValueError, match="duplicate image name.*X_1"):
        read_isic(tmp_path / "b.csv")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_isic(tmp_path / "nope.csv")


def test_isic2019_mapping(tmp_path):
    (tmp_path / "ISIC_2019_Training_GroundTruth.csv").write_text(
        "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"
        "ISIC_0000000,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
        "ISIC_0000001,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
        "ISIC_0000002_downsampled,0.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
        "ISIC_0000003,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n")
    (tmp_path / "ISIC_2019_Training_Metadata.csv").write_text(
        "image,age_approx,anatom_site_general,lesion_id,sex\n"
        "ISIC_0000000,55.0,anterior torso,BCN_1,female\n"
        "ISIC_0000001,30.0,posterior torso,BCN_1,male\n"
        "ISIC_0000002_downsampled,,lateral torso,,\n"
        "ISIC_0000003,70.0,head/neck,BCN_2,male\n")
    r = read_isic(tmp_path / "ISIC_2019_Training_GroundTruth.csv")
    t = r.table.set_index("image_name")
    assert r.source == "isic2019"
    assert list(t["site"]) == ["torso", "torso", "torso", "head/neck"]
    assert list(t["target"]) == [0, 1, 0, 1]
    assert list(t["diagnosis"]) == ["NV", "MEL", "BCC", "MEL"]
    assert t.loc["ISIC_0000001", "patient_id"] == "BCN_1"
    assert t.loc["ISIC_0000002_downsampled", "patient_id"] == "ISIC_0000002_downsampled"
    enc = MetadataEncoding()
    v = enc.encode(t.loc["ISIC_0000002_downsampled", "age_approx"], "", "lateral torso")
    assert v[1] == 1 and v[enc.names.index("sex=unknown")] == 1 and v[enc.names.index("site=torso")] == 1
    # ground-truth values that are no probabilities are skipped with their reason, never read as 0/1
    gt = (tmp_path / "ISIC_2019_Training_GroundTruth.csv").read_text()
    (tmp_path / "bad_gt.csv").write_text(gt.replace("ISIC_0000001,1.0", "ISIC_0000001,nan")
                                         .replace("ISIC_0000003,1.0", "ISIC_0000003,-1"))
    r = read_isic(tmp_path / "bad_gt.csv", tmp_path / "ISIC_2019_Training_Metadata.csv")
    assert sorted(r.table["image_name"]) == ["ISIC_0000000", "ISIC_0000002_downsampled"]
    assert {k.image_name: k.reason for k in r.skipped}["ISIC_0000003"].startswith("ground-truth values outside [0, 1]")
    # a metadata file that matches none of the images (the wrong --metadata-csv) is an error, not 4 images
    # without age, site and lesion
    (tmp_path / "other_meta.csv").write_text("image,age_approx,anatom_site_general,lesion_id,sex\nISIC_9,50,torso,L,male\n")
    with pytest.raises(ValueError, match=r"0 of the 4 images .* are in this metadata file"):
        read_isic(tmp_path / "ISIC_2019_Training_GroundTruth.csv", tmp_path / "other_meta.csv")
    (tmp_path / "ISIC_2019_Training_Metadata.csv").unlink()
    with pytest.raises(FileNotFoundError, match="ISIC_2019_Training_Metadata.csv"):
        read_isic(tmp_path / "ISIC_2019_Training_GroundTruth.csv")


def test_verify_catches_damage(shards_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards_dir, copy)
    assert shards_main(["verify", str(copy), "--quiet"]) == 0
    m = load_manifest(copy)
    first = copy / m["folds"][0]["shards"][0]["path"]
    with open(first, "r+b") as f:
        f.truncate(first.stat().st_size - 3000)
    second = copy / m["folds"][1]["shards"][0]["path"]
    data = bytearray(second.read_bytes())
    data[700] ^= 0xFF
    second.write_bytes(bytes(data))
    (copy / m["folds"][2]["shards"][0]["index"]).unlink()
    capsys.readouterr()
    assert shards_main(["verify", str(copy), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{first}: " in err and "truncated" in err
    assert f"{second}: sha256 differs" in err
    assert "index file missing" in err and m["folds"][2]["shards"][0]["index"] in err


def test_synth_deterministic(tmp_path):
    a = synthesize(tmp_path / "a", 10, seed=7, size=40, progress=False).parent
    b = synthesize(tmp_path / "b", 10, seed=7, size=40, progress=False).parent
    c = synthesize(tmp_path / "c", 10, seed=8, size=40, progress=False).parent
    assert (a / "train.csv").read_bytes() == (b / "train.csv").read_bytes()
    for i in range(10):
        name = f"jpeg/train/SYN_{i:07d}.jpg"
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "jpeg/train/SYN_0000000.jpg").read_bytes() != (c / "jpeg/train/SYN_0000000.jpg").read_bytes()
    df = pd.read_csv(a / "train.csv")
    assert df.groupby("patient_id").size().max() > 1, "several images per patient"


def test_isic2019_images_without_a_metadata_row_are_recorded(tmp_path):
    names = [f"ISIC_{i:07d}" for i in range(10)]
    (tmp_path / "gt.csv").write_text("image,MEL,NV\n" + "".join(f"{n},{i % 2}.0,{1 - i % 2}.0\n" for i, n in enumerate(names)))
    (tmp_path / "meta.csv").write_text("image,age_approx,anatom_site_general,lesion_id,sex\n"
                                       + "".join(f"{n},50,head/neck,L{i},male\n" for i, n in enumerate(names[:9])))
    r = read_isic(tmp_path / "gt.csv", tmp_path / "meta.csv")  # 9 of 10 (≥ 90 %): built, the 10th recorded
    assert r.no_metadata == ["ISIC_0000009"] and len(r.table) == 10
    row = r.table.set_index("image_name").loc["ISIC_0000009"]
    assert row["site"] == "unknown" and row["sex"] == "" and row["lesion_id"] == ""  # sex: encoded as unknown
