"""Hostile and careless inputs to the shard builder and the readers of shards: changed image sources,
concurrent builds, killed builds, tampered indexes, tars and manifests."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import SHARD_OPTS

from zoome_dist.cli.shards import main as shards_main
from zoome_dist.data.manifest import load_manifest, verify
from zoome_dist.data.synth import synthesize
from zoome_dist.data.writer import BuildOptions, build, build_lock
from zoome_dist.pipeline import LOADERS, make_loader

ROOT = Path(__file__).resolve().parents[1]


def copy_shards(shards_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(shards_dir, tmp_path / "shards"))


def test_resume_with_another_image_folder_is_refused(synth_data, tmp_path):
    out = tmp_path / "out"
    build(synth_data / "train.csv", synth_data / "jpeg" / "train", out, SHARD_OPTS, progress=False)
    other = Path(shutil.copytree(synth_data / "jpeg" / "train", tmp_path / "other"))
    first = sorted(other.iterdir())[0]
    first.write_bytes(sorted(other.iterdir())[1].read_bytes())  # same names, one image differs
    (out / "manifest.json").unlink()  # as if interrupted
    with pytest.raises(ValueError, match="images, images_fingerprint"):
        build(synth_data / "train.csv", other, out, SHARD_OPTS, resume=True, progress=False)
    m = build(synth_data / "train.csv", synth_data / "jpeg" / "train", out, SHARD_OPTS, resume=True, progress=False)
    assert m["source"]["images"] == str((synth_data / "jpeg" / "train").resolve())
    assert len(m["source"]["images_fingerprint"]) == 64


def test_second_build_into_the_same_folder_fails_at_once(synth_data, tmp_path):
    out = tmp_path / "out"
    with build_lock(out):
        t = time.perf_counter()
        with pytest.raises(FileExistsError, match=r"being built by another process .*lock"):
            build(synth_data / "train.csv", synth_data / "jpeg" / "train", out, SHARD_OPTS, resume=True,
                  progress=False)
        assert time.perf_counter() - t < 30
    build(synth_data / "train.csv", synth_data / "jpeg" / "train", out, SHARD_OPTS, resume=True, progress=False)


def build_under_way(tmp_path: Path, **popen) -> tuple[subprocess.Popen, list[str]]:
    """A 2-worker build of 480 images, returned once it has written its first shard (and its command): early
    enough that a signal sent then finds it at work even on a loaded machine (a CI run that waited for two
    shards of 240 images once signalled a build that had finished)."""
    data = tmp_path / "data"
    synthesize(data, 480, seed=1, size=128, progress=False)
    cmd = [sys.executable, "-m", "zoome_dist.cli.shards", "build", "--csv", str(data / "train.csv"), "--images",
           str(data / "jpeg" / "train"), "--out", str(tmp_path / "out"), "--num-folds", "2", "--max-side", "0",
           "--samples-per-shard", "4", "--workers", "2", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, **popen)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "out" / ".build").glob("fold-*.json")):
        time.sleep(0.05)
    return proc, cmd


@pytest.mark.slow
def test_killed_build_leaves_no_workers(tmp_path):
    proc, _ = build_under_way(tmp_path)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers, "the build should be running its workers"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers outlived their killed parent: {[p.pid for p in alive]}"


@pytest.mark.parametrize("loader", LOADERS)
def test_index_entry_past_the_tar_is_refused_before_reading(shards_dir, tmp_path, loader):
    shards = copy_shards(shards_dir, tmp_path)
    idx = sorted(shards.glob("fold-00/*.idx"))[0]
    lines = idx.read_text().splitlines()
    tok = lines[1].split()
    tok[2] = str(10**10)  # the first field's size
    lines[1] = " ".join(tok)
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{idx.name}:2: field .* past the end"):
        make_loader(shards, [0], train=False, batch_size=4, image_size=32, loader=loader, num_threads=1)


def _fix_checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()


def test_verify_reports_hostile_tars_as_fail_lines(shards_dir, tmp_path):
    shards = copy_shards(shards_dir, tmp_path)
    tars = sorted(shards.glob("fold-0*/*.tar"))
    with tarfile.open(tars[0], "a") as tf:  # a symlink member
        link = tarfile.TarInfo("zzz.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    raw = bytearray(tars[1].read_bytes())  # first member declares 8 GiB
    header = raw[:512]
    header[124:136] = b"77777777777\0"
    _fix_checksum(header)
    raw[:512] = header
    tars[1].write_bytes(bytes(raw))
    problems = verify(shards, progress=False)
    assert any("is not a regular file" in p and tars[0].name in p for p in problems)
    assert any("past the end" in p and tars[1].name in p for p in problems)
    assert shards_main(["verify", str(shards), "--quiet"]) != 0


@pytest.mark.parametrize("bad", ["/etc/passwd", "../../etc/passwd", "fold-00/../../outside.tar"])
def test_manifest_paths_must_stay_inside(shards_dir, tmp_path, bad, capsys):
    shards = copy_shards(shards_dir, tmp_path)
    m = json.loads((shards / "manifest.json").read_text())
    m["folds"][0]["shards"][0]["path"] = bad
    (shards / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="not a relative path inside the shard folder|outside the shard folder"):
        load_manifest(shards)
    assert shards_main(["verify", str(shards), "--quiet"]) == 2
    assert "error:" in capsys.readouterr().err


def test_manifest_symlink_out_of_the_folder(shards_dir, tmp_path):
    shards = copy_shards(shards_dir, tmp_path)
    (shards / "escape").symlink_to("/etc")
    m = json.loads((shards / "manifest.json").read_text())
    m["folds"][0]["shards"][0]["index"] = "escape/passwd"
    (shards / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="resolves outside the shard folder"):
        load_manifest(shards)


def test_non_json_manifest(shards_dir, tmp_path):
    shards = copy_shards(shards_dir, tmp_path)
    (shards / "manifest.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(ValueError, match="not a JSON manifest"):
        load_manifest(shards)


def test_empty_and_non_utf8_csv(tmp_path, capsys):
    img = tmp_path / "img"
    img.mkdir()
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "latin.csv").write_bytes("image_name,patient_id\nJos\xe9,1\n".encode("latin-1"))
    for name, message in (("empty.csv", "empty CSV file"), ("latin.csv", "not UTF-8 text")):
        rc = shards_main(["build", "--csv", str(tmp_path / name), "--images", str(img), "--out",
                          str(tmp_path / "o"), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err


def test_build_out_that_is_a_file(synth_data, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        build(synth_data / "train.csv", synth_data / "jpeg" / "train", tmp_path / "f", BuildOptions(folds=2),
              progress=False)


def test_inflated_fold_count_fails_before_training(shards_dir, tmp_path):
    """A manifest whose fold claims more samples than folds.csv lists: one line, exit 2, before any rank
    trains (it used to train a whole epoch, then fail with a traceback)."""
    import os

    copy = tmp_path / "shards"
    shutil.copytree(shards_dir, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["folds"][1]["samples"] += 5
    (copy / "manifest.json").write_text(json.dumps(m))
    r = subprocess.run([sys.executable, "-m", "zoome_dist.train", "--shards", str(copy), "--fold", "0", "--out",
                        str(tmp_path / "run"), "--set", "data.image_size=32"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "WORLD_SIZE": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "counts" in r.stderr and "fold 1" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_ctrl_c_in_a_build_is_one_line_and_resumable(tmp_path):
    proc, cmd = build_under_way(tmp_path, stderr=subprocess.PIPE, text=True)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; rerun with --resume" in err and "Traceback" not in err, err[-2000:]
    r = subprocess.run([*cmd, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert verify(tmp_path / "out", progress=False) == []


def test_exclude_file_that_is_not_utf8_is_named(synth_data, tmp_path):
    (tmp_path / "ex.txt").write_bytes(b"ISIC_1\n\xff\xfe\n")
    with pytest.raises(ValueError, match=r"--exclude .*ex.txt: not UTF-8"):
        build(synth_data / "train.csv", synth_data / "jpeg" / "train", tmp_path / "out", SHARD_OPTS,
              progress=False, exclude=tmp_path / "ex.txt")


def test_a_damaged_near_duplicate_never_replaces_its_intact_copy(tmp_path):
    """A near-duplicate pair whose first copy (the one the keep rule prefers) is damaged: the intact copy
    is kept and written, the damaged one skipped as damaged, so the lesion stays in the shards."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    (tmp_path / "img").mkdir()
    yy, xx = np.mgrid[0:384, 0:384]
    rows = []
    for i in range(6):  # textured lesions: 75 kB JPEGs, so 300 bytes cut off the end spoil only the last rows
        rng = np.random.default_rng(i)
        cy, cx = rng.integers(100, 284, 2)
        img = (np.stack([120 + 100 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2000 + 500 * i))] * 2
                        + [80 + 0.3 * xx], -1) + rng.normal(0, 20, (384, 384, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / "img" / f"A_{i}.jpg", quality=90)
        rows.append({"image_name": f"A_{i}", "patient_id": f"P{i}", "sex": "male", "age_approx": 50,
                     "anatom_site_general_challenge": "torso", "target": i % 2})
    good = (tmp_path / "img" / "A_5.jpg").read_bytes()
    (tmp_path / "img" / "A_0.jpg").write_bytes(good[: len(good) - 300] + b"\xff\xd9")  # A_5, its tail cut off
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    m = build(tmp_path / "train.csv", tmp_path / "img", tmp_path / "out",
              BuildOptions(folds=2, max_side=0, samples_per_shard=4), progress=False)
    reasons = {s["image_name"]: s["reason"] for s in m["skipped"]}
    assert list(reasons) == ["A_0"] and "damaged JPEG" in reasons["A_0"], reasons
    folds = pd.read_csv(tmp_path / "out" / "folds.csv")
    assert "A_5" in set(folds["image_name"]) and m["totals"]["samples"] == 5


def test_an_image_folder_holding_none_of_the_images_is_an_error_before_any_output(synth_data, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"none of the \d+ images isic2020 lists is in .*empty \(e.g. SYN_\d+\.jpg\)"):
        build(synth_data / "train.csv", tmp_path / "empty", tmp_path / "out", SHARD_OPTS, progress=False)
    assert not (tmp_path / "out").exists()
