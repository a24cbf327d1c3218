"""ZooME model family on CPU with small inputs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from zoome_dist.models import MODELS, ZoomSE, create_model
from zoome_dist.models.pretrained import load_pretrained
from zoome_dist.train.losses import make_loss

torch.manual_seed(0)
IMG = torch.randn(2, 3, 64, 64)
META = torch.rand(2, 12)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shape_every_model(name):
    model = create_model(name).eval()
    with torch.no_grad():
        out = model(IMG, META)
    assert out.shape == (2,) and torch.isfinite(out).all()


@pytest.mark.parametrize("name,opts", [("zoome", {}), ("alexnet_meta", {}),
                                       ("zoome", {"backbone": "resnet18", "pool_size": 2})])
def test_every_parameter_gets_a_gradient(name, opts):
    model = create_model(name, **opts).train()
    loss = make_loss("focal")(model(IMG, META), torch.tensor([0, 1]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        # A narrow Zoom-SE (4 hidden units in resnet18's first stage) can have an all-dead ReLU
        # for 2 samples, which zeroes fc1 and fc2.weight; the gate's fc2.bias and every other
        # layer must still see a non-zero gradient.
        if ".attn.fc1." not in pname and ".attn.fc2.weight" not in pname:
            assert p.grad.abs().sum() > 0, f"{pname} received a zero gradient"


@pytest.mark.parametrize("pool", [1, 2, 4, 8])
def test_pool_sizes(pool):
    model = create_model("zoome", backbone="resnet18", pool_size=pool).eval()
    assert model(IMG, META).shape == (2,)
    assert all(m.pool_size == pool for m in model.modules() if isinstance(m, ZoomSE))


@pytest.mark.parametrize("hw,pool", [(4, 4), (3, 6), (5, 5)])
def test_pool_covering_the_map_is_average_pool_se(hw, pool):
    se = ZoomSE(32, pool_size=pool).eval()
    x = torch.randn(3, 32, hw, hw)
    ref = x * torch.sigmoid(se.fc2(F.relu(se.fc1(x.mean((2, 3), keepdim=True)))))
    torch.testing.assert_close(se(x), ref)
    # and a small pool is not average pooling: it zooms in on maxima
    assert not torch.allclose(ZoomSE(32, pool_size=1).squeeze(x), x.mean((2, 3), keepdim=True))


def test_without_zoomse_and_meta_reproduces_torchvision():
    tv = torchvision.models.resnext50_32x4d(weights=None, num_classes=1).eval()
    model = create_model("resnext50").eval()
    model.backbone.load_state_dict(tv.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(IMG, META), tv(IMG).squeeze(1))


def test_parameter_count_matches_formulas():
    tv = torchvision.models.resnext50_32x4d(weights=None, num_classes=1)
    channels = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    zoom_se = sum(2 * c * (c // 16) + c // 16 + c for c in channels)
    meta = (12 * 256 + 256) + (256 * 2048 + 2048)
    model = create_model("zoome")
    assert n_params(model) == n_params(tv) + zoom_se + meta
    assert sum(isinstance(m, ZoomSE) for m in model.modules()) == 16


def test_metadata_changes_the_output():
    model = create_model("zoome", backbone="resnet18").eval()
    with torch.no_grad():
        a = model(IMG, META)
        b = model(IMG, torch.flip(META, [1]))
    assert not torch.allclose(a, b)
    no_meta = create_model("zoome_no_meta", backbone="resnet18").eval()
    with torch.no_grad():
        torch.testing.assert_close(no_meta(IMG, META), no_meta(IMG, torch.flip(META, [1])))


def test_pretrained_round_trip(tmp_path):
    tv = torchvision.models.resnext50_32x4d(weights=None)  # 1000-class ImageNet head
    path = tmp_path / "resnext50_imagenet.pth"
    torch.save(tv.state_dict(), path)
    model = create_model("zoome", pretrained=str(path))
    sd, tvsd = model.state_dict(), tv.state_dict()
    torch.testing.assert_close(sd["backbone.layer3.2.block.conv2.weight"], tvsd["layer3.2.conv2.weight"])
    torch.testing.assert_close(sd["backbone.bn1.running_var"], tvsd["bn1.running_var"])
    report = load_pretrained(model, path)
    assert len(report.loaded) == len(tvsd) - 2
    assert report.ignored == ["fc.bias", "fc.weight"]
    assert all(".attn." in k or k.startswith(("meta.", "backbone.fc.")) for k in report.fresh)
    assert any(".attn." in k for k in report.fresh) and "meta.fc1.weight" in report.fresh
    # the plain wrapped backbone then computes exactly torchvision's features
    plain = create_model("resnext50", pretrained=str(path)).eval()
    tv_feat = torch.nn.Sequential(*list(tv.children())[:-2]).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.features(IMG), tv_feat(IMG))
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="r18.pth"):
        create_model("zoome", pretrained=str(tmp_path / "r18.pth"))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        create_model("zoome", pretrained=str(tmp_path / "absent.pth"))


def test_registry_errors():
    with pytest.raises(ValueError, match=r"Unknown model 'zoom'.*'zoome'"):
        create_model("zoom")
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['poolsize'\].*'pool_size'"):
        create_model("zoome", poolsize=2)
    with pytest.raises(ValueError, match=r"Invalid backbone 'vgg16'.*resnet18"):
        create_model("zoome", backbone="vgg16")
    with pytest.raises(ValueError, match="backbone"):
        create_model("alexnet", backbone="resnet18")


def test_channels_last_and_bf16_autocast():
    model = create_model("zoome", backbone="resnet18").eval()
    with torch.no_grad():
        ref = model(IMG, META)
        cl = model.to(memory_format=torch.channels_last)(IMG.to(memory_format=torch.channels_last), META)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = model(IMG, META)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
    assert bf.dtype == torch.bfloat16 and torch.allclose(bf.float(), ref, atol=0.1)


def test_focal_loss():
    logits, target = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1, 0, 0])
    p = torch.sigmoid(logits)
    pt = torch.where(target == 1, p, 1 - p)
    at = torch.where(target == 1, 0.25, 0.75)
    expect = (-at * (1 - pt) ** 2 * torch.log(pt)).mean()
    torch.testing.assert_close(make_loss("focal")(logits, target), expect)
    torch.testing.assert_close(make_loss("bce")(logits, target),
                               F.binary_cross_entropy_with_logits(logits, target.float()))
    with pytest.raises(ValueError, match="Invalid loss 'mse'"):
        make_loss("mse")


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # neither layout: every other column of a wider map
        return torch.stack([t, t], -1).flatten(-2)[..., ::2]
    return t.contiguous()


def _fwd_bwd(m: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, autocast: bool = False):
    """Output, input gradient and parameter gradients; ``x`` keeps its strides (a leaf, not a copy)."""
    m.zero_grad()
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = m(x)
    y.backward(dy)
    return y.detach(), x.grad, {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("c,hw,pool", [(64, 8, 4), (32, 7, 4), (48, 5, 3), (32, 6, 1), (16, 12, 4)])
def test_fused_zoomse_matches_reference(layout, c, hw, pool):
    """Maps divisible by P (8, 12, 6 with P = 1) take max_pool2d in the fused path, the others the adaptive
    pool; ReLU-like zeros make ties, which both pools must break the same way. Either memory layout, or
    neither. Under bf16 autocast the fused path is checked against float64 on the same bf16 map (the
    plain path under autocast rounds more: a poor reference)."""
    torch.manual_seed(c * 100 + hw * 10 + pool)
    ref, fused = ZoomSE(c, pool, impl="plain"), ZoomSE(c, pool)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, c, hw, hw)
    x[:, : c // 2] = x[:, : c // 2].clamp(min=0)  # half the channels with many tied zeros
    dy = torch.randn_like(x)
    x, dy = _layout(x, layout), _layout(dy, layout)
    if layout == "strided":
        assert not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
    (yr, gr, pr), (yf, gf, pf) = _fwd_bwd(ref, x, dy), _fwd_bwd(fused, x, dy)
    torch.testing.assert_close(yf, yr)
    torch.testing.assert_close(gf, gr)
    for name, grad in pr.items():
        torch.testing.assert_close(pf[name], grad, rtol=1e-3, atol=1e-4, msg=name)
    xb, dyb = _layout(x.bfloat16(), layout), _layout(dy.bfloat16(), layout)
    yb, gb, pb = _fwd_bwd(fused, xb, dyb, autocast=True)
    exact = copy.deepcopy(ref).double()
    y64, g64, p64 = _fwd_bwd(exact, xb.double(), dyb.double())  # same values, same maxima and ties
    assert yb.dtype == torch.bfloat16 and gb.dtype == torch.bfloat16
    for name, got, want in (("output", yb, y64), ("input grad", gb, g64)):
        torch.testing.assert_close(got.double(), want, rtol=0.02, atol=0.02 * float(want.abs().max()), msg=name)
    # the gate MLP's gradients sum bf16 products dy·u over the map, then over channels, with cancellation: a
    # bias gradient can be tiny beside its errors, so each layer is held to 5% of its weight's and bias's scale
    for name, want in p64.items():
        layer = name.split(".")[0]
        scale = max(float(g.abs().max()) for n, g in p64.items() if n.startswith(layer + "."))
        torch.testing.assert_close(pb[name].double(), want, rtol=0.02, atol=0.05 * scale, msg=name)


@pytest.mark.slow
def test_torch_compile_traces_fused_zoomse():
    """Dynamo + AOT autograd (the ``aot_eager`` backend: the tracing inductor builds on, without its
    C++ compile) through the fused Zoom-SE function: same outputs and gradients as eager."""
    torch._dynamo.reset()
    model = create_model("zoome", backbone="resnet18").eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    img = IMG.clone().requires_grad_()
    ref_img = IMG.clone().requires_grad_()
    out, ref = compiled(img, META), model(ref_img, META)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(img.grad, ref_img.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_of_fused_zoomse_under_autocast():
    """``model.compile`` with bf16 training: compiled under autocast, the fused Zoom-SE must leave the
    rest of the model autocast (it once turned autocast off for every later op under dynamo, so the
    next conv met bf16 activations with float32 weights and the compile failed). Same outputs as eager;
    gradients within bf16 rounding (the compiled backward of the gate MLP runs under the traced
    autocast, eager's in float32)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model("zoome", backbone="resnet18").train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    results = []
    for m in (model, compiled):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(IMG, META)
        out.float().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref, ref_grads), (out, grads) = results
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0.05, atol=0.05 * float(grad.abs().max()) + 1e-6,
                                   msg=name)


def _with_backbone_of(model: torch.nn.Module, plain: torch.nn.Module) -> torch.nn.Module:
    """``model`` with ``plain``'s backbone weights (its ``.block`` keys mapped), Zoom-SE weights kept."""
    own = model.state_dict()
    for k, v in plain.state_dict().items():
        parts = k.split(".")
        wrapped = ".".join(parts[:3] + ["block"] + parts[3:]) if parts[1].startswith("layer") else k
        own[wrapped if wrapped in own else k] = v
    model.load_state_dict(own)
    return model


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])  # BasicBlock and Bottleneck
@pytest.mark.parametrize("placement", ["residual", "output"])
def test_open_gates_reproduce_the_plain_backbone(backbone, placement):
    """Gates initialised to 1 (bias 20: sigmoid = 1.0 in float32) leave either placement equal to the
    backbone without Zoom-SE: what a pretrained backbone should see at the start of fine-tuning."""
    torch.manual_seed(0)
    plain = create_model("resnext50", backbone=backbone).eval()  # no Zoom-SE, no metadata
    model = create_model("zoome_no_meta", backbone=backbone, zoom_se_placement=placement, zoom_se_gate_bias=20.0)
    model = _with_backbone_of(model, plain).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), plain.features(x), rtol=0, atol=0)


def test_output_placement_is_the_default_and_residual_differs():
    torch.manual_seed(0)
    default = create_model("zoome_no_meta", backbone="resnet18").eval()
    torch.manual_seed(0)
    output = create_model("zoome_no_meta", backbone="resnet18", zoom_se_placement="output").eval()
    residual = create_model("zoome_no_meta", backbone="resnet18", zoom_se_placement="residual").eval()
    residual.load_state_dict(default.state_dict())  # same keys, same weights
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(output(x, None), default(x, None), rtol=0, atol=0)
        # output placement gates the identity path too: 8 gates ≈ 0.5 shrink the last map; residual does not
        shrink = default.features(x).abs().mean() / residual.features(x).abs().mean()
    assert shrink < 0.1
    block = default.backbone.layer1[0]
    y = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(block(y), block.attn(block.block(y)))


def test_gate_bias_sets_every_gate():
    se = ZoomSE(32, pool_size=2, gate_bias=3.0)
    x = torch.rand(4, 32, 8, 8) + 0.1
    torch.testing.assert_close(se(x) / x, torch.full_like(x, torch.sigmoid(torch.tensor(3.0)).item()))
    with pytest.raises(ValueError, match="zoom_se_placement 'inside'"):
        create_model("zoome", backbone="resnet18", zoom_se_placement="inside")
    from zoome_dist.config import load_config, validate

    with pytest.raises(ValueError, match="gates saturate"):  # sigmoid(20) = 1.0: no gradient ever
        validate(load_config(overrides={"model.zoom_se_gate_bias": 20.0}))


def test_meta_fusion_concat_and_meta_learning_rate():
    from zoome_dist.config import load_config
    from zoome_dist.train.engine import build_model, build_optimizer

    cfg = load_config(overrides={"model.backbone": "resnet18", "model.meta_fusion": "concat", "model.meta_hidden": 32,
                                 "optim.meta_lr_mult": 10.0, "optim.lr": 0.001})
    model = build_model(cfg)
    assert model.meta is None and model.backbone.fc.in_features == 512 + 32
    x, m = torch.randn(2, 3, 64, 64), torch.rand(2, 12)
    model(x, m).sum().backward()
    assert model.meta_features.fc1.weight.grad.abs().sum() > 0  # the metadata reaches the logit directly
    opt = build_optimizer(cfg, model)
    assert [g["lr"] for g in opt.param_groups] == [0.001, pytest.approx(0.01)]
    meta_ids = {id(p) for p in model.meta_features.parameters()}
    assert {id(p) for p in opt.param_groups[1]["params"]} == meta_ids
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    both = build_model(load_config(overrides={"model.backbone": "resnet18", "model.meta_fusion": "both"}))
    assert both.meta is not None and both.meta_features is not None
    no_meta = load_config(overrides={"model.name": "zoome_no_meta", "model.backbone": "resnet18",
                                     "optim.meta_lr_mult": 10.0})
    assert len(build_optimizer(no_meta, build_model(no_meta)).param_groups) == 1  # nothing to single out


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_the_fused_optimizer_steps_as_the_default_one(name):
    """``fused`` (training on CUDA; torch's fused kernels run on CPU too): the same step as the default
    implementation, the metadata branch's own learning rate included."""
    from zoome_dist.config import load_config
    from zoome_dist.train.engine import build_model, build_optimizer

    cfg = load_config(overrides={"model.backbone": "resnet18", "optim.name": name, "optim.meta_lr_mult": 10.0,
                                 "optim.weight_decay": 0.01})
    torch.manual_seed(0)
    models = [build_model(cfg), build_model(cfg)]
    models[1].load_state_dict(models[0].state_dict())
    x, m = torch.randn(2, 3, 32, 32), torch.rand(2, 12)
    for model, fused in zip(models, (False, True)):
        opt = build_optimizer(cfg, model, fused=fused)
        assert all(bool(g.get("fused")) == fused for g in opt.param_groups)
        model(x, m).sum().backward()
        opt.step()  # one step: Adam's update g/(√v + ε) amplifies the rounding of a later step's near-zero gradients
    for (name_, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name_)


def test_metadata_only_synthetic_labels():
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from zoome_dist.data.metadata import MetadataEncoding
    from zoome_dist.data.synth import sample_table

    enc = MetadataEncoding()
    t = sample_table(3000, 0, 0.2, label_from="metadata")
    x = np.stack([enc.encode(a if a != "" else None, s, site) for a, s, site in
                  zip(t["age_approx"], t["sex"], t["anatom_site_general_challenge"])])
    y = t["target"].to_numpy()
    model = LogisticRegression(max_iter=1000).fit(x[:2400], y[:2400])
    assert roc_auc_score(y[2400:], model.predict_proba(x[2400:])[:, 1]) > 0.8
    with pytest.raises(ValueError, match="label_from"):
        sample_table(10, 0, 0.2, label_from="pixels")
