"""The GPU check's data-parallel projection (``launchers/benchmarks/dp.py``): its arithmetic, the step it picks
from the check's own figures, and the all-reduce it measures (2 real gloo processes on this machine); its verdict
on the Triton Zoom-SE."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launchers"))
from benchmarks import dp  # noqa: E402
from benchmarks.gpu import bench_dp_gpu, bench_zoom_se_blocks, triton_verdict  # noqa: E402


def test_the_projection_charges_a_ring_all_reduce_per_step():
    nbytes, world, bw = 100 * 10**6, 8, 350e9
    got = dp.project(0.008, 8, nbytes, bw, world)
    reduce_s = nbytes * 2 * 7 / 8 / bw
    assert got["global_batch"] == 64 and got["allreduce_ms"] == pytest.approx(reduce_s * 1e3, abs=1e-3)
    assert got["img_s"] == pytest.approx(64 / (0.008 + reduce_s), abs=0.1)
    # the bus bandwidth of a measured all-reduce gives that all-reduce's time back at the same world size
    assert dp.project(1.0, 8, nbytes, dp.busbw(nbytes, 0.05, 2), 2)["allreduce_ms"] == pytest.approx(50.0)


def test_the_gpu_check_projects_from_its_fastest_micro8_step():
    """With fewer than 2 local ranks nothing is measured and both assumed links are projected."""
    res = {"models": {"bf16_micro8": {"zoome_img_s": 179.0, "zoome_triton_img_s": 400.0}},
           "graphs": {"micro": 8, "zoome_fused": {"img_s": 900.0}, "zoome_triton": {"error": "no triton"}}}
    got = bench_dp_gpu(res, measure_ranks=1)
    assert got["step_from"] == "graphs zoome_fused" and got["step_ms"] == pytest.approx(8 / 900 * 1e3, abs=0.01)
    assert isinstance(got["measured"], str) and "modelled" in got["measured"]
    nbytes = dp.grad_bytes()
    assert got["grad_mb"] == round(nbytes / 2**20, 1) and 90 < got["grad_mb"] < 110  # ZooME: ~26 M parameters
    for name, gbs in dp.ASSUMED_BUSBW_GBS.items():
        assert got[f"projection_{name}"] == {"assumed_busbw_gb_s": gbs, **dp.project(8 / 900, 8, nbytes, gbs * 1e9)}


@pytest.mark.slow
def test_the_all_reduce_is_measured_across_real_processes():
    t = dp.allreduce_s(4 * 2**20, 2, "gloo", iters=3, timeout=120)
    assert 0 < t < 10
    with pytest.raises(ValueError, match="at least 2 ranks, got world=1"):
        dp.allreduce_s(1024, 1, "gloo")
    with pytest.raises(RuntimeError, match="all-reduce over 2 local ranks failed"):  # NCCL without GPUs: ends at once
        dp.allreduce_s(1024, 2, "nccl", timeout=60)


def test_the_triton_verdict_needs_equal_values_and_more_speed_at_every_micro_batch():
    models = {"bf16_micro8": {"zoome_img_s": 179.0, "zoome_triton_img_s": 400.0},
              "bf16_micro64": {"zoome_img_s": 1378.0, "zoome_triton_img_s": 1500.0},
              "fp16_micro8": {"zoome_img_s": 224.0, "zoome_triton_img_s": 100.0}}  # bf16 is what training runs
    yes = triton_verdict({"triton": {"equal": True}, "models": models, "measured_in": {"triton": "t", "models": "t"}})
    assert yes["triton_for_auto"] is True and yes["triton_over_fused"] == {"bf16_micro8": 2.235, "bf16_micro64": 1.089}
    assert triton_verdict({"triton": {"equal": False}, "models": models})["why"] == "not equal to the fused path"
    slower = {**models, "bf16_micro64": {"zoome_img_s": 1378.0, "zoome_triton_img_s": 1300.0}}
    no = triton_verdict({"triton": {"equal": True}, "models": slower})
    assert no["triton_for_auto"] is False and no["why"] == "slower at bf16_micro64"
    assert triton_verdict({"models": models})["triton_for_auto"] is None  # no evidence of equality: no verdict
    mixed = {"triton": {"equal": True}, "models": models, "measured_in": {"triton": "t1", "models": "t2"}}
    assert triton_verdict(mixed)["triton_for_auto"] is None  # parts of two runs (another GPU, another commit)
    assert triton_verdict({"triton": {"error": "RuntimeError: ..."}, "models": models})["triton_for_auto"] is None


@pytest.mark.slow
def test_the_block_timing_runs_both_paths_per_stage_map():
    """A smoke run of the GPU check's ``zoom_se_blocks`` part on CPU (Triton under the interpreter)."""
    got = bench_zoom_se_blocks("cpu", batches=(2,), dtype=torch.float32, shapes=((40, 7),), n=1)
    row = got["b2_40x7x7"]
    assert set(row) == {"elementwise_ms", "fused_fwd_ms", "fused_fwd_bwd_ms", "triton_fwd_ms", "triton_fwd_bwd_ms"}
    assert all(v > 0 for v in row.values())
