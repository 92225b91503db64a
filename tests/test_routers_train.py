"""Every router through the trainer on two CPU processes (deepspeed launcher, gloo), ZeRO-2:
expert parallelism (--ep-size 2) must give the losses and exports of --ep-size 1, the routing
heatmaps must come out of the export, and for the sigmoid-bias router the bias must follow the
global load (the same as one process's) and resume exactly."""

import subprocess
import sys

import pytest
import torch
from test_expert_parallel_train import assert_same_exports, records

from dit_moe.checkpoint import load_model

from trainer_runs import REPO, env, losses, run_train

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]
ROUTERS = ["topk", "expert-choice", "sigmoid-bias"]
RUN = ["--global-batch-size", "4", "--max-steps", "3", "--aux-loss-coef", "0"]


def router_run(tmp_path_factory, router, *args, launcher="deepspeed"):
    out = tmp_path_factory.mktemp(f"{router}-run")
    run_train(out, *RUN, "--router", router, *args, launcher=launcher)
    return out


@pytest.fixture(scope="module", params=ROUTERS)
def runs(request, tmp_path_factory):
    router = request.param
    return router, router_run(tmp_path_factory, router), router_run(tmp_path_factory, router, "--ep-size", "2")


def gates(results_dir):
    model = load_model(results_dir / "export.safetensors", prefer_ema=False)
    return [model.blocks[i].moe.gate for i in model.moe_blocks]


def test_router_trains_with_and_without_expert_parallelism(runs, tmp_path):
    router, ep1, ep2 = runs
    expected, got = records(ep1), records(ep2)
    assert sorted(got) == [1, 2, 3]
    for step in expected:
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5), step
    assert_same_exports(ep2, ep1)
    model = load_model(ep2 / "export.safetensors")
    assert model.config.moe.router == router
    if router == "expert-choice":
        assert got[3]["expert_load_cv"] == pytest.approx(0.0, abs=1e-6)  # every expert takes C tokens
        for gate in gates(ep2):  # three training forwards calibrated the threshold
            assert gate.threshold_norm.item() == pytest.approx(1 - 0.99**3)
        ema = load_model(ep2 / "export.safetensors")  # the EMA, as sampling loads it
        ema_gates = [ema.blocks[i].moe.gate for i in ema.moe_blocks]
        for gate, live in zip(ema_gates, gates(ep2)):  # recalibrated for the EMA at export, averaged over ranks
            assert gate.calibrated and gate.threshold_norm.item() == pytest.approx(1 - 0.99**8)
            assert not torch.equal(gate.threshold, live.threshold)
    if router == "sigmoid-bias":
        steps = [gate.expert_bias / model.config.moe.bias_update_rate for gate in gates(ep2)]
        assert any(s.abs().sum() > 0 for s in steps)
        for s in steps:  # 3 updates of +-u (or 0) each
            torch.testing.assert_close(s, s.round(), atol=1e-3, rtol=0)
            assert s.abs().max() <= 3 + 1e-3

    heatmaps = tmp_path / "heatmaps"
    proc = subprocess.run(
        [sys.executable, "-m", "dit_moe.routing", "all", "--ckpt", str(ep2 / "export.safetensors"), "--out-dir",
         str(heatmaps), "--vae-path", "none", "--classes", "0,1", "--samples-per-class", "1",
         "--num-sampling-steps", "2", "--device", "cpu"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert {"heatmap_class.png", "heatmap_patch.png", "heatmap_step.png"} <= {p.name for p in heatmaps.iterdir()}


def test_sigmoid_bias_follows_the_global_load_and_resumes_exactly(tmp_path_factory, tmp_path):
    two_ranks = router_run(tmp_path_factory, "sigmoid-bias")
    one_process = router_run(tmp_path_factory, "sigmoid-bias", launcher=None)
    for step, loss in losses(one_process).items():
        assert losses(two_ranks)[step] == pytest.approx(loss, rel=1e-5), step
    for a, b in zip(gates(two_ranks), gates(one_process)):
        torch.testing.assert_close(a.expert_bias, b.expert_bias, rtol=0, atol=1e-7)

    run_train(tmp_path, *RUN[:2], "--max-steps", "2", *RUN[4:], "--router", "sigmoid-bias", "--ep-size", "2",
              launcher="deepspeed")  # fmt: skip
    run_train(tmp_path, *RUN, "--router", "sigmoid-bias", "--ep-size", "2", "--resume", "auto", launcher="deepspeed")
    uninterrupted = router_run(tmp_path_factory, "sigmoid-bias", "--ep-size", "2")
    assert losses(tmp_path)[3] == losses(uninterrupted)[3]
    assert_same_exports(tmp_path, uninterrupted, exact=True)
