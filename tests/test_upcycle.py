"""Upcycling: the upcycled model computes the dense model's function at step 0, then trains apart."""

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dit_moe.checkpoint import CheckpointError, infer_config, load_model, read_checkpoint_file, save_export
from dit_moe.diffusion import ObjectiveConfig
from dit_moe.models import DiT, DiTConfig
from dit_moe.upcycle import (
    ExpertInit,
    UpcycleError,
    UpcycleRequest,
    moe_layers_every,
    upcycle_checkpoint,
    upcycle_moe_args,
    upcycle_state_dict,
)

from reference_dit import randomize_
from tiny_dit import tiny_config

ROOT = Path(__file__).resolve().parents[1]
CUSTOM = DiTConfig(
    input_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=48,
    depth=3,
    num_heads=3,
    mlp_ratio=2.0,
    num_classes=10,
    learn_sigma=False,
    qk_norm=True,
)


def _dense(config=None):
    return randomize_(DiT(config or tiny_config())).eval()


def _inputs(n=3):
    """The same inputs on every call, so two models' outputs can be compared."""
    x = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return x, torch.tensor([1, 500, 999, 250][:n]), torch.tensor([0, 3, 9, 5][:n])


def _build(config, state):
    model = DiT(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _outputs(model, train):
    """Forward in eval mode, or in train mode with label dropout off (the config keeps its 0.1)."""
    model.train(train)
    model.y_embedder.dropout_prob = 0.0
    return model(*_inputs())


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "config, experts", [(None, (8, 2)), (CUSTOM, (4, 4))], ids=["DiT-T/2-E8k2", "custom-depth3-width48-E4k4"]
)
def test_upcycled_equals_dense(config, experts):
    dense = _dense(config)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    moe_config, state = upcycle_state_dict(dense.state_dict(), dense.config, upcycle_moe_args(*experts))
    assert (moe_config.num_experts, moe_config.moe.num_experts_per_tok) == experts
    assert (moe_config.moe.expert_type, moe_config.moe.n_shared_experts, moe_config.moe.norm_topk_prob) == (
        "gelu",
        0,
        True,
    )
    assert (moe_config.class_dropout_prob, moe_config.moe.aux_loss_coef, moe_config.moe.moe_layers) == (0.1, 0.01, None)
    moe = _build(moe_config, state)
    assert moe.moe_blocks == list(range(dense.config.depth))
    for train in (False, True):
        torch.testing.assert_close(_outputs(moe, train), _outputs(dense, train), msg=f"train={train}")
    for key, value in dense.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} was modified by the transform"


def test_partial_upcycling_keeps_other_blocks_dense():
    dense = _dense()
    assert moe_layers_every(6, 2) == [1, 3, 5] and moe_layers_every(6, 1) == list(range(6))
    moe_config, state = upcycle_state_dict(
        dense.state_dict(), dense.config, upcycle_moe_args(4, 2, moe_layers=moe_layers_every(6, 2))
    )
    assert moe_config.moe.moe_layers == [1, 3, 5]
    assert "blocks.0.mlp.fc1.weight" in state and "blocks.1.mlp.fc1.weight" not in state
    assert state["blocks.1.moe.experts.fc1_weight"].shape == (4, 512, 128)
    assert infer_config(state).moe.moe_layers == [1, 3, 5]  # files without a config still load
    moe = _build(moe_config, state)
    assert moe.moe_blocks == [1, 3, 5]
    torch.testing.assert_close(_outputs(moe, False), _outputs(dense, False))


def test_expert_noise_breaks_symmetry_within_the_stated_bound():
    dense = _dense()
    results = {}
    for sigma in (0.0, 1e-3, 1e-2):
        config, state = upcycle_state_dict(
            dense.state_dict(), dense.config, upcycle_moe_args(4, 2), ExpertInit(expert_noise=sigma)
        )
        results[sigma] = (state, _build(config, state))
    noisy_state, noisy = results[1e-2]
    assert torch.equal(noisy_state["blocks.0.moe.gate.weight"], results[0.0][0]["blocks.0.moe.gate.weight"])
    w = noisy_state["blocks.0.moe.experts.fc1_weight"]
    assert not torch.equal(w[0], w[1])

    # Layer bound: per token, |MoE(h) - f(h)| <= max_e |f_e(h) - f(h)| (a convex combination of experts).
    h = torch.randn(2, 16, 128)
    mlp, layer = dense.blocks[0].mlp, noisy.blocks[0].moe
    experts = layer.experts
    per_expert = torch.stack(
        [
            F.linear(
                F.gelu(F.linear(h, experts.fc1_weight[e], experts.fc1_bias[e]), approximate="tanh"),
                experts.fc2_weight[e],
                experts.fc2_bias[e],
            )
            - mlp(h)
            for e in range(4)
        ]
    ).norm(dim=-1)  # [E, N, T]
    with torch.no_grad():
        moe_diff = (layer(h)[0] - mlp(h)).norm(dim=-1)  # [N, T]
    assert moe_diff.max() > 0
    assert torch.all(moe_diff <= per_expert.max(dim=0).values + 1e-6)

    # Whole network: the change is O(sigma): nonzero, small, and ~10x larger for a 10x larger sigma.
    ref = _outputs(dense, False)
    diff = {s: (_outputs(results[s][1], False) - ref).norm() / ref.norm() for s in (1e-3, 1e-2)}
    assert 0 < diff[1e-2] < 1e-2 * 2
    assert 5 < diff[1e-2] / diff[1e-3] < 20


def test_training_after_upcycling_lowers_loss_and_experts_diverge():
    from dit_moe.diffusion import create_diffusion

    dense = _dense(CUSTOM.replace(learn_sigma=True))
    config, state = upcycle_state_dict(dense.state_dict(), dense.config, upcycle_moe_args(4, 2))  # router noise only
    moe = _build(config, state)
    diffusion = create_diffusion(timestep_respacing="", learn_sigma=True)
    x, _, y = _inputs(4)
    t, noise = torch.tensor([10, 300, 600, 900]), torch.randn_like(x)

    def loss(model):
        """(IDDPM loss, MoE aux losses) of one train-mode forward with label dropout off."""
        model.train()
        model.y_embedder.dropout_prob = 0.0
        aux = {}

        def forward(x_t, t, y):
            out, layer_aux = model(x_t, t, y, return_aux=True)
            aux.update(layer_aux)
            return out

        return diffusion.training_losses(forward, x, t, model_kwargs=dict(y=y), noise=noise)["loss"].mean(), aux

    dense_loss, _ = loss(dense)
    first, aux = loss(moe)
    torch.testing.assert_close(first, dense_loss)
    assert set(aux) == {"moe_aux_loss"}
    routed = [int((b.moe.tokens_per_expert > 0).sum()) for b in moe.blocks]
    assert max(routed) > 2, "tokens must spread over more than k experts for the experts to diverge"

    optimizer = torch.optim.Adam(moe.parameters(), lr=1e-3)
    for _ in range(4):
        main, aux = loss(moe)
        optimizer.zero_grad()
        (main + sum(aux.values())).backward()
        optimizer.step()
    last, _ = loss(moe)
    assert last < first, (first.item(), last.item())
    for block in moe.blocks:
        w = block.moe.experts.fc1_weight.detach()
        assert (w - w[:1]).abs().amax(dim=(1, 2))[1:].max() > 0, "experts are still identical copies"


def _swiglu_oracle():
    """A dense SwiGLU DiT, expressed as the one model that computes it today: one expert, top-1, no shared."""
    config = CUSTOM.replace(num_experts=1, num_experts_per_tok=1, n_shared_experts=0, expert_type="swiglu")
    oracle = randomize_(DiT(config)).eval()
    dense_state = {}
    for key, value in oracle.state_dict().items():
        if ".moe.gate." in key:
            continue
        if ".moe.experts." in key:
            block, name = key.split(".moe.experts.")
            dense_state[f"{block}.mlp.{name}.weight"] = value[0]
        else:
            dense_state[key] = value
    return oracle, dense_state


def test_swiglu_dense_source_upcycles_to_swiglu_experts(tmp_path):
    oracle, dense_state = _swiglu_oracle()
    dense_config = oracle.config.replace(num_experts=0)
    moe_config, state = upcycle_state_dict(dense_state, dense_config, upcycle_moe_args(4, 2))
    assert moe_config.moe.expert_type == "swiglu" and state["blocks.0.moe.experts.gate_proj"].shape == (4, 96, 48)
    torch.testing.assert_close(_outputs(_build(moe_config, state), False), _outputs(oracle, False))

    torch.save(dense_state, tmp_path / "swiglu.pt")
    upcycle_checkpoint(UpcycleRequest(tmp_path / "swiglu.pt", tmp_path / "moe.pt", upcycle_moe_args(4, 2)))
    torch.testing.assert_close(_outputs(load_model(tmp_path / "moe.pt"), False), _outputs(oracle, False))
    with pytest.raises(UpcycleError, match="Partial upcycling of a SwiGLU model"):
        upcycle_state_dict(dense_state, dense_config, upcycle_moe_args(4, 2, moe_layers=[1]))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_own_export_round_trip_keeps_config(tmp_path, suffix):
    dense = _dense(CUSTOM)
    src = save_export(
        tmp_path / f"dense{suffix}",
        dense.config,
        dense.state_dict(),
        objective=ObjectiveConfig(objective="flow", flow_t_scale=1000.0),
    )
    digest = _sha(src)
    _, moe_config, out = upcycle_checkpoint(
        UpcycleRequest(src, tmp_path / f"moe{suffix}", upcycle_moe_args(4, 2, moe_layers=[0, 2]))
    )
    assert _sha(src) == digest
    stored = read_checkpoint_file(out)
    assert stored.model_config == moe_config and stored.model_config.qk_norm
    assert stored.model_config.moe.moe_layers == [0, 2]
    assert stored.trained_as.recorded == ObjectiveConfig(objective="flow", flow_t_scale=1000.0)
    torch.testing.assert_close(_outputs(load_model(out), False), _outputs(dense, False))


def test_cli_end_to_end_uses_ema_and_leaves_source_untouched(tmp_path):
    model, ema = _dense(), _dense()
    src = tmp_path / "0001000.pt"
    torch.save(
        {"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "ema": ema.state_dict(), "opt": {}}, src
    )
    digest = _sha(src)
    out = tmp_path / "moe.safetensors"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "upcycle.py"),
            "--model",
            "DiT-T/2",
            "--ckpt",
            str(src),
            "--num_experts",
            "4",
            "--num-experts-per-tok",
            "2",
            "--image-size",
            "64",
            "--num_classes",
            "10",
            "--moe-every",
            "2",
            "--expert_noise",
            "0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "MoE blocks 1,3,5" in result.stdout
    assert _sha(src) == digest
    upcycled = load_model(out)
    assert upcycled.config.moe.moe_layers == [1, 3, 5] and upcycled.config.num_experts == 4
    torch.testing.assert_close(_outputs(upcycled, False), _outputs(ema, False))


def _cli():
    spec = importlib.util.spec_from_file_location("upcycle_cli", ROOT / "upcycle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_errors_are_one_clear_sentence(tmp_path, capsys):
    dense = _dense()
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    out = tmp_path / "moe.pt"

    with pytest.raises(UpcycleError, match="--model DiT-S/2 does not match .* holds DiT-T/2; pass --model DiT-T/2"):
        upcycle_checkpoint(UpcycleRequest(tmp_path / "dense.pt", out, model="DiT-S/2"))
    with pytest.raises(UpcycleError, match="num_experts_per_tok=5 exceeds num_experts=4"):
        upcycle_checkpoint(UpcycleRequest(tmp_path / "dense.pt", out, upcycle_moe_args(4, 5)))
    with pytest.raises(UpcycleError, match="top-1 would scale"):
        upcycle_state_dict(dense.state_dict(), dense.config, upcycle_moe_args(4, 1))
    with pytest.raises(UpcycleError, match="--image-size 256 does not match .* pass --image-size 64"):
        upcycle_checkpoint(UpcycleRequest(tmp_path / "dense.pt", out, image_size=256))
    with pytest.raises(UpcycleError, match="moe_layers \\[6\\] must be a non-empty subset of blocks 0..5"):
        upcycle_state_dict(dense.state_dict(), dense.config, upcycle_moe_args(4, 2, moe_layers=[6]))
    assert not out.exists()

    config, state = upcycle_state_dict(dense.state_dict(), dense.config, upcycle_moe_args(4, 2))
    save_export(tmp_path / "moe_export.pt", config, state)
    torch.save(state, tmp_path / "moe_plain.pt")
    for already in ("moe_export.pt", "moe_plain.pt"):
        with pytest.raises(UpcycleError, match="already an MoE model"):
            upcycle_checkpoint(UpcycleRequest(tmp_path / already, out))

    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a DiT checkpoint"):
        upcycle_checkpoint(UpcycleRequest(tmp_path / "foreign.pt", out))
    odd = {k.replace(".mlp.fc1.", ".mlp.w1."): v for k, v in dense.state_dict().items()}
    torch.save(odd, tmp_path / "odd.pt")
    with pytest.raises(UpcycleError, match="Block 0 has no dense MLP this tool knows"):
        upcycle_checkpoint(UpcycleRequest(tmp_path / "odd.pt", out))

    cli = _cli()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--ckpt", str(tmp_path / "dense.pt"), "--out", str(out), "--model", "DiT-S/2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("upcycle.py: error: --model DiT-S/2 does not match") and err.count("\n") == 1
    assert not out.exists()


def test_module_entry_is_the_same_command(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dit_moe.upcycle",
            "--ckpt",
            str(tmp_path / "missing.pt"),
            "--out",
            str(tmp_path / "moe.pt"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert (
        result.stderr.startswith("python -m dit_moe.upcycle: error: Checkpoint") and "does not exist" in result.stderr
    )
