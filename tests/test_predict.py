"""``zoome predict`` / ``zoome explain`` on synthetic images with real checkpoints files."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from zoome_dist.cli.main import main as zoome_main
from zoome_dist.config import load_config
from zoome_dist.data.metadata import MetadataEncoding
from zoome_dist.data.synth import render, sample_features
from zoome_dist.infer.explain import explain
from zoome_dist.infer.predict import find_checkpoints, load_member, predict
from zoome_dist.train.engine import build_model
from zoome_dist.train.run import save_model

ENC = MetadataEncoding()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A run folder's model files as training writes them (resnet18 ZooME, 48 px, fixed random weights;
    last epoch = best epoch)."""
    torch.manual_seed(0)
    cfg = load_config(overrides={"model.backbone": "resnet18", "model.pool_size": 2, "data.image_size": 48})
    run = tmp_path_factory.mktemp("run")
    model = build_model(cfg)
    for name in ("model_best.pt", "model_last.pt"):
        save_model(run / name, cfg, model, ENC.to_dict(), 0, {"auc": 0.5, "threshold": 0.5})
    return run


def write_images(root: Path, n: int, size: int = 64) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rng = np.random.default_rng([11, i])
        Image.fromarray(render(rng, sample_features(rng, i % 2), size)).save(root / f"T_{i:03d}.jpg", quality=90)
        rows.append({"image_name": f"T_{i:03d}", "patient_id": f"P{i}", "sex": ["male", "female", ""][i % 3],
                     "age_approx": ["", "45", "70"][i % 3], "anatom_site_general_challenge": "torso"})
    pd.DataFrame(rows).to_csv(root / "test.csv", index=False)
    return root


def test_one_row_per_input_in_order_and_bad_images(checkpoint, tmp_path, capsys):
    root = write_images(tmp_path / "imgs", 10)
    csv = pd.read_csv(root / "test.csv", dtype=str, keep_default_na=False).iloc[::-1]  # reversed order
    csv.to_csv(root / "test.csv", index=False)
    (root / "T_003.jpg").unlink()
    (root / "T_005.jpg").write_bytes((root / "T_004.jpg").read_bytes()[:300])  # truncated
    out = tmp_path / "pred.csv"
    rc = zoome_main(["predict", "--checkpoint", str(checkpoint), "--csv", str(root / "test.csv"),
                     "--images", str(root), "--out", str(out), "--batch-size", "3"])
    assert rc == 0
    pred = pd.read_csv(out)
    expect = [n for n in csv["image_name"] if n not in ("T_003", "T_005")]
    assert list(pred.columns) == ["image_name", "target"] and list(pred["image_name"]) == expect
    assert pred["target"].between(0, 1).all() and pred["target"].nunique() > 1
    errors = pd.read_csv(tmp_path / "pred.errors.csv").set_index("image_name")["reason"]
    assert errors["T_003"] == "missing image file" and "cannot decode" in errors["T_005"]
    err = capsys.readouterr().err
    assert "not scored: T_003" in err and "2 image(s) could not be scored" in err
    # the same images scored one at a time give the same probabilities (batching/order independent)
    member = load_member(checkpoint / "model_best.pt", torch.device("cpu"))
    single, _ = predict([member], root / "test.csv", root, batch_size=1)
    np.testing.assert_allclose(single["prob"], pred["target"], rtol=1e-5, atol=1e-6)


def test_tta_of_symmetric_input_equals_no_tta(checkpoint, tmp_path):
    root = tmp_path / "sym"
    root.mkdir()
    yy, xx = np.mgrid[0:64, 0:64] - 31.5
    r = np.hypot(xx, yy)
    img = np.stack([200 - 3 * r, 150 - 2 * r, 120 - np.abs(xx * yy) / 20], -1).clip(0, 255).astype(np.uint8)
    assert (img == img[:, ::-1]).all() and (img == img[::-1]).all() and (img == img.transpose(1, 0, 2)).all()
    Image.fromarray(img).save(root / "S_000.jpg", format="PNG")  # lossless: exactly symmetric pixels
    pd.DataFrame([{"image_name": "S_000", "sex": "male", "age_approx": "60",
                   "anatom_site_general_challenge": "torso"}]).to_csv(root / "test.csv", index=False)
    member = load_member(checkpoint / "model_best.pt", torch.device("cpu"))
    probs = {n: predict([member], root / "test.csv", root, tta=n)[0]["prob"].iloc[0] for n in (1, 2, 8)}
    assert probs[2] == pytest.approx(probs[1], abs=1e-5) and probs[8] == pytest.approx(probs[1], abs=1e-5)
    # and TTA does change an asymmetric image's score
    write_images(tmp_path / "asym", 2)
    plain = predict([member], tmp_path / "asym" / "test.csv", tmp_path / "asym", tta=1)[0]["prob"]
    tta8 = predict([member], tmp_path / "asym" / "test.csv", tmp_path / "asym", tta=8)[0]["prob"]
    assert not np.allclose(plain, tta8)


def test_ensemble_of_identical_checkpoints_equals_one(checkpoint, tmp_path):
    root = write_images(tmp_path / "imgs", 6)
    twin = tmp_path / "twin"
    shutil.copytree(checkpoint, twin)
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    base = ["--csv", str(root / "test.csv"), "--images", str(root), "--tta", "2"]
    assert zoome_main(["predict", "--checkpoint", str(checkpoint), "--out", str(one), *base]) == 0
    assert zoome_main(["predict", "--checkpoint", str(checkpoint), "--checkpoint", str(twin), "--out", str(two),
                       *base]) == 0
    np.testing.assert_allclose(pd.read_csv(two)["target"], pd.read_csv(one)["target"], rtol=1e-6)
    shutil.copytree(checkpoint, tmp_path / "cv" / "fold-00")
    shutil.copytree(checkpoint, tmp_path / "cv" / "fold-01")
    assert len(find_checkpoints([str(tmp_path / "cv")])) == 2  # a folder of runs is the ensemble of all


def test_isic_format_is_scorable(checkpoint, tmp_path):
    root = write_images(tmp_path / "imgs", 6)
    out = tmp_path / "isic.csv"
    assert zoome_main(["predict", "--checkpoint", str(checkpoint), "--csv", str(root / "test.csv"), "--images",
                       str(root), "--out", str(out), "--format", "isic"]) == 0
    assert list(pd.read_csv(out).columns) == ["image", "MEL"]
    truth = tmp_path / "truth.csv"
    pd.DataFrame({"image_name": [f"T_{i:03d}" for i in range(6)], "target": [0, 1] * 3}).to_csv(truth, index=False)
    assert zoome_main(["score", "--truth", str(truth), "--pred", str(out), "--json"]) == 0
    with pytest.raises(ValueError, match="Invalid --tta 3"):
        predict([load_member(checkpoint / "model_best.pt", torch.device("cpu"))], root / "test.csv", root, tta=3)


def test_explanation_maps(checkpoint, tmp_path):
    member = load_member(checkpoint / "model_best.pt", torch.device("cpu"))
    rng = np.random.default_rng([2, 1])
    lesion = render(rng, sample_features(rng, 1), 48)
    image = ((torch.from_numpy(lesion).permute(2, 0, 1).float() / 255 - 0.45) / 0.225)[None]
    meta = torch.from_numpy(ENC.encode(70, "male", "head/neck"))[None]
    e = explain(member.model, image, meta, ENC, zoom_blocks=2)
    assert e.gradcam.shape == (48, 48) and np.isfinite(e.gradcam).all() and e.gradcam.std() > 0
    assert len(e.zoom_cells) == 2 and all(c.shape == (2, 2) and c.std() > 0 for c in e.zoom_cells)
    assert e.meta_logit_delta is not None and e.meta_logit_delta != 0
    assert all(getattr(m, "fused", True) for m in member.model.modules() if hasattr(m, "fused")), \
        "explain must restore the fused Zoom-SE path"
    Image.fromarray(lesion).save(tmp_path / "lesion.jpg")
    out = tmp_path / "why.png"
    assert zoome_main(["explain", "--checkpoint", str(checkpoint), "--image", str(tmp_path / "lesion.jpg"),
                       "--meta", "age=70,sex=male,site=head/neck", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("age", ["inf", "1e9", "-50", "nan", "old"])
def test_bad_age_is_a_listed_problem_not_a_blank_probability(checkpoint, tmp_path, capsys, age):
    root = write_images(tmp_path / "imgs", 4)
    csv = pd.read_csv(root / "test.csv", dtype=str, keep_default_na=False)
    csv.loc[1, "age_approx"] = age
    csv.to_csv(root / "test.csv", index=False)
    out = tmp_path / "pred.csv"
    rc = zoome_main(["predict", "--checkpoint", str(checkpoint), "--csv", str(root / "test.csv"),
                     "--images", str(root), "--out", str(out)])
    assert rc == 0
    pred = pd.read_csv(out)
    assert list(pred["image_name"]) == ["T_000", "T_002", "T_003"] and pred["target"].notna().all()
    errors = pd.read_csv(tmp_path / "pred.errors.csv")
    assert errors["image_name"].tolist() == ["T_001"] and "malformed age_approx" in errors["reason"][0]


def test_predict_out_checked_before_inference(checkpoint, tmp_path, capsys):
    root = write_images(tmp_path / "imgs", 2)
    for out, message in ((tmp_path / "missing" / "pred.csv", "does not exist"), (tmp_path, "is a folder")):
        rc = zoome_main(["predict", "--checkpoint", str(checkpoint), "--csv", str(root / "test.csv"),
                         "--images", str(root), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "ensemble of" not in err, "checked only after the inference"


def test_planted_model_best_is_refused(tmp_path, capsys):
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"config": Payload(), "state_dict": {}, "metadata_encoding": {}}, tmp_path / "model_last.pt")
    root = write_images(tmp_path / "imgs", 2)
    rc = zoome_main(["predict", "--checkpoint", str(tmp_path), "--csv", str(root / "test.csv"),
                     "--images", str(root), "--out", str(tmp_path / "p.csv")])
    assert rc == 2 and "refused to load" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_explain_csv_never_follows_unsafe_names(checkpoint, tmp_path, capsys):
    root = write_images(tmp_path / "imgs" / "inner", 2)
    Image.open(root / "T_000.jpg").save(tmp_path / "imgs" / "secret.jpg")
    csv = pd.read_csv(root / "test.csv", dtype=str, keep_default_na=False)
    csv.loc[0, "image_name"] = "../secret"
    csv.to_csv(root / "test.csv", index=False)
    rc = zoome_main(["explain", "--checkpoint", str(checkpoint), "--csv", str(root / "test.csv"),
                     "--images", str(root), "--out", str(tmp_path / "why.png")])
    err = capsys.readouterr().err
    assert rc == 0 and "not explained: ../secret: unsafe image name" in err
    assert "secret: P(melanoma)" not in err and "T_001: P(melanoma)" in err


def test_explain_reports_the_probability_predict_writes(checkpoint, tmp_path, capsys):
    """One decode path: the P(melanoma) an explanation shows is the one `zoome predict` writes."""
    root = write_images(tmp_path / "imgs", 3)
    assert zoome_main(["predict", "--checkpoint", str(checkpoint), "--csv", str(root / "test.csv"),
                       "--images", str(root), "--out", str(tmp_path / "pred.csv")]) == 0
    pred = pd.read_csv(tmp_path / "pred.csv").set_index("image_name")["target"]
    capsys.readouterr()
    assert zoome_main(["explain", "--checkpoint", str(checkpoint), "--csv", str(root / "test.csv"),
                       "--images", str(root), "--out", str(tmp_path / "why.png")]) == 0
    shown = {ln.split(":")[0]: float(ln.split("P(melanoma) ")[1].split(",")[0])
             for ln in capsys.readouterr().err.splitlines() if "P(melanoma)" in ln}
    assert sorted(shown) == sorted(pred.index)
    for name, p in shown.items():
        assert p == pytest.approx(pred[name], abs=1e-4), name


def test_temperature_scaling_recovers_an_overconfident_model():
    from zoome_dist.eval.calibration import apply_temperature, fit_temperature
    from zoome_dist.eval.metrics import ece

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(len(z)) < 1 / (1 + np.exp(-z))).astype(int)
    p = 1 / (1 + np.exp(-2 * z))  # logits twice too large
    t = fit_temperature(y, p)
    assert t == pytest.approx(2.0, rel=0.05)
    assert ece(y, apply_temperature(p, t)) < 0.3 * ece(y, p)


def test_decisions_at_stored_threshold_calibration_selection_and_rank_ensemble(checkpoint, tmp_path, capsys):
    from zoome_dist.eval.calibration import apply_temperature, stamp_checkpoint

    root = write_images(tmp_path / "imgs", 8)
    base = ["--csv", str(root / "test.csv"), "--images", str(root)]
    plain = tmp_path / "plain.csv"
    assert zoome_main(["predict", "--checkpoint", str(checkpoint), "--out", str(plain), *base]) == 0
    p = pd.read_csv(plain)["target"].to_numpy()
    cut = float(np.sort(p)[3] + 1e-9)
    # a fixed threshold
    assert zoome_main(["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "a.csv"),
                       "--threshold", str(cut), *base]) == 0
    assert list(pd.read_csv(tmp_path / "a.csv")["decision"]) == list((p >= cut).astype(int))
    # oof: refused until a CV stored one; then decisions at it, calibrated or not
    assert zoome_main(["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "b.csv"),
                       "--threshold", "oof", *base]) == 2
    assert "no out-of-fold threshold" in capsys.readouterr().err
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run)
    stamp_checkpoint(run / "model_last.pt", {"threshold": cut, "temperature": 1.7})
    for extra in ([], ["--calibrate"]):
        out = tmp_path / f"c{len(extra)}.csv"
        assert zoome_main(["predict", "--checkpoint", str(run), "--out", str(out), "--threshold", "oof",
                           *extra, *base]) == 0
        got = pd.read_csv(out)
        assert list(got["decision"]) == list((p >= cut).astype(int))  # calibration never moves a decision
        expect = apply_temperature(p, 1.7) if extra else p
        np.testing.assert_allclose(got["target"], expect, rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert zoome_main(["predict", "--checkpoint", str(run), "--out", str(tmp_path / "s.csv"), *base]) == 0
    assert f"out-of-fold threshold of {cut:.4f}" in capsys.readouterr().err  # the operating point is visible
    assert zoome_main(["predict", "--checkpoint", str(run), "--out", str(tmp_path / "d.csv"), "--threshold", "1.5",
                       *base]) == 2
    assert "Invalid --threshold '1.5'" in capsys.readouterr().err
    for bad in (["--ensemble", "rank"], ["--format", "isic"]):  # ranks are no probabilities; ISIC has no column
        assert zoome_main(["predict", "--checkpoint", str(run), "--out", str(tmp_path / "d.csv"), "--threshold",
                           "0.5", *bad, *base]) == 2
    assert "--ensemble rank writes ranks" in capsys.readouterr().err
    # rank averaging of two members: mean of each member's ranks
    twin = tmp_path / "twin"
    twin.mkdir()
    torch.manual_seed(1)
    cfg = load_config(overrides={"model.backbone": "resnet18", "model.pool_size": 2, "data.image_size": 48})
    save_model(twin / "model_last.pt", cfg, build_model(cfg), ENC.to_dict(), 0, {})
    members = [load_member(c / "model_last.pt", torch.device("cpu")) for c in (checkpoint, twin)]
    singles = [predict([m], root / "test.csv", root)[0]["prob"] for m in members]
    ranked, _ = predict(members, root / "test.csv", root, ensemble="rank")
    np.testing.assert_allclose(ranked["prob"], (singles[0].rank(pct=True) + singles[1].rank(pct=True)) / 2)
    # --select: a run folder with only the best epoch's model says so
    (run / "model_last.pt").unlink()
    assert zoome_main(["predict", "--checkpoint", str(run), "--out", str(tmp_path / "e.csv"), *base]) == 2
    assert "pass --select best" in capsys.readouterr().err
    assert zoome_main(["predict", "--checkpoint", str(run), "--select", "best", "--out", str(tmp_path / "e.csv"),
                       *base]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_pytorch_on_images(checkpoint, tmp_path, fmt):
    """One model and a 2-member ensemble, exported, score real images like ``predict`` does."""
    import json

    from zoome_dist.eval.calibration import stamp_checkpoint

    twin = tmp_path / "twin"
    twin.mkdir()
    torch.manual_seed(1)
    cfg = load_config(overrides={"model.backbone": "resnet18", "model.pool_size": 2, "data.image_size": 48})
    save_model(twin / "model_last.pt", cfg, build_model(cfg), ENC.to_dict(), 0, {})
    stamp_checkpoint(twin / "model_last.pt", {"threshold": 0.3, "temperature": 1.5})
    root = write_images(tmp_path / "imgs", 5)
    for ckpts in ([checkpoint], [checkpoint, twin]):
        out = tmp_path / f"m{len(ckpts)}.{fmt}"
        args = [x for c in ckpts for x in ("--checkpoint", str(c))]
        assert zoome_main(["export", *args, "--format", fmt, "--out", str(out)]) == 0
        info = json.loads(out.with_name(out.name + ".json").read_text())
        assert info["image_size"] == 48 and info["max_abs_diff_vs_pytorch"] <= 1e-4
        members = [load_member(next(Path(c).glob("model_last.pt")), torch.device("cpu")) for c in ckpts]
        expect, _ = predict(members, root / "test.csv", root)
        images = np.stack([np.asarray(Image.open(root / f"{n}.jpg").convert("RGB").resize((48, 48), Image.BILINEAR),
                                      dtype=np.float32) / 255 for n in expect["image_name"]]).transpose(0, 3, 1, 2)
        from zoome_dist.infer.predict import read_test_csv

        _, meta, _ = read_test_csv(root / "test.csv", ENC)
        shipped = tmp_path / f"shipped{len(ckpts)}"  # what the user copies elsewhere: the files it lists
        shipped.mkdir()
        assert info["files"] == [out.name] and sorted(p.name for p in tmp_path.glob(f"{out.name}*")) == \
            [out.name, out.name + ".card.md", out.name + ".json"]  # nothing else was left beside it
        card = out.with_name(out.name + ".card.md").read_text()  # models of no CV: the card says what it lacks
        assert f"mean probability of {len(ckpts)} model(s), 48 px" in card and "No single cross-validation card" in card
        for name in info["files"]:
            shutil.copy(out.with_name(name), shipped / name)
        if fmt == "onnx":
            import onnxruntime

            got = onnxruntime.InferenceSession(str(shipped / out.name)).run(None, {"image": images, "metadata": meta})[0]
        else:
            got = torch.jit.load(str(shipped / out.name))(torch.from_numpy(images), torch.from_numpy(meta)).numpy()
        # the same images through our own resize give the exported graph's inputs (antialiased
        # bilinear in both): probabilities agree closely, not bit for bit
        np.testing.assert_allclose(got, expect["prob"], atol=2e-3)
    if fmt == "onnx":  # weights too large to inline: one external file, named after the final file, listed
        import onnxruntime

        import zoome_dist.infer.export as ex

        big = tmp_path / "big" / "m.onnx"
        big.parent.mkdir()
        limit, ex.ONNX_INLINE_LIMIT = ex.ONNX_INLINE_LIMIT, 0
        try:
            info = ex.export([load_member(checkpoint / "model_last.pt", torch.device("cpu"))], fmt, big)
        finally:
            ex.ONNX_INLINE_LIMIT = limit
        assert info["files"] == ["m.onnx.data", "m.onnx"]
        assert sorted(p.name for p in big.parent.iterdir()) == ["m.onnx", "m.onnx.data", "m.onnx.json"]
        moved = tmp_path / "moved"
        shutil.copytree(big.parent, moved)
        shutil.rmtree(big.parent)
        assert onnxruntime.InferenceSession(str(moved / "m.onnx")).run(None, {"image": images, "metadata": meta})[0].shape == (5,)
    with pytest.raises(ValueError, match="no out-of-fold temperature"):
        from zoome_dist.infer.export import export
        export([load_member(checkpoint / "model_last.pt", torch.device("cpu"))], fmt, tmp_path / "x", calibrate=True)


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_images_follow_the_shard_builders_rules(checkpoint, tmp_path, loader):
    """What the builder skips as damaged is not scored (with the builder's reason); what it converts
    (GIF, BMP, ICO under a .jpg/.png name) is scored as the builder's JPEG, on both loaders (DALI used
    to die with signal 11 on a GIF named .jpg, the torch loader to raise on a BMP named .png)."""
    from zoome_dist.data.images import prepare_image

    root = write_images(tmp_path / "imgs", 6, size=64)
    good = (root / "T_000.jpg").read_bytes()
    (root / "T_001.jpg").write_bytes(good[: len(good) // 2] + b"\xff\xd9")  # truncated, then re-terminated
    rgb = Image.open(root / "T_002.jpg").convert("RGB")
    rgb.save(root / "T_002.jpg", format="GIF")
    (root / "T_003.jpg").unlink()
    rgb.save(root / "T_003.png", format="BMP")
    (root / "T_004.jpg").unlink()
    rgb.resize((48, 48)).save(root / "T_004.png", format="ICO", sizes=[(48, 48)])
    member = load_member(checkpoint / "model_last.pt", torch.device("cpu"))
    pred, problems = predict([member], root / "test.csv", root, loader=loader, threads=1)
    reasons = {p["image_name"]: p["reason"] for p in problems}
    assert list(reasons) == ["T_001"] and reasons["T_001"].startswith("damaged JPEG")
    assert list(pred["image_name"]) == ["T_000", "T_002", "T_003", "T_004", "T_005"]
    # the GIF scores as the builder's conversion of it does
    conv = tmp_path / "conv"
    conv.mkdir()
    (conv / "T_002.jpg").write_bytes(prepare_image((root / "T_002.jpg").read_bytes(), "T_002.jpg")[0])
    pd.read_csv(root / "test.csv").iloc[[2]].to_csv(conv / "test.csv", index=False)
    ref, _ = predict([member], conv / "test.csv", conv, loader=loader, threads=1)
    assert pred.set_index("image_name").loc["T_002", "prob"] == pytest.approx(ref["prob"].iloc[0], abs=1e-6)


def test_predict_never_writes_over_its_inputs(checkpoint, tmp_path, capsys):
    root = write_images(tmp_path / "imgs", 2)
    csv_before = (root / "test.csv").read_bytes()
    for out in (root / "test.csv", checkpoint / "model_last.pt"):
        before = out.read_bytes()
        assert zoome_main(["predict", "--checkpoint", str(checkpoint), "--csv", str(root / "test.csv"),
                           "--images", str(root), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "would destroy it" in err and "Traceback" not in err and out.read_bytes() == before
    assert (root / "test.csv").read_bytes() == csv_before


def test_a_model_file_whose_weights_do_not_fit_is_a_one_line_error(checkpoint, tmp_path, capsys):
    state = torch.load(checkpoint / "model_last.pt", weights_only=True)
    key = next(k for k in state["state_dict"] if k.endswith("conv1.weight"))
    state["state_dict"][key] = state["state_dict"][key][:, :1]  # wrong shape
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(state, bad / "model_last.pt")
    root = write_images(tmp_path / "imgs", 1)
    for argv in (["predict", "--checkpoint", str(bad), "--csv", str(root / "test.csv"), "--images", str(root),
                  "--out", str(tmp_path / "p.csv")],
                 ["export", "--checkpoint", str(bad), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]):
        assert zoome_main(argv) == 2
        err = capsys.readouterr().err
        assert "its weights do not fit" in err and "Traceback" not in err, err


def test_nothing_scorable_writes_no_predictions_file(checkpoint, tmp_path, capsys):
    root = write_images(tmp_path / "imgs", 2)
    for p in root.glob("*.jpg"):
        p.unlink()
    out = tmp_path / "p.csv"
    assert zoome_main(["predict", "--checkpoint", str(checkpoint), "--csv", str(root / "test.csv"), "--images",
                       str(root), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "none of the 2 image(s) could be scored (missing image file" in err and "Traceback" not in err
    assert not out.exists() and len(pd.read_csv(tmp_path / "p.errors.csv")) == 2
