"""Router state kept right around the training step: expert choice samples as it trained (thresholds
for the EMA's weights, refused without them, batch-independent images, experts per token measured),
sigmoid-bias balances without an auxiliary loss and updates its bias once per applied optimizer
step, and gradient checkpointing does not repeat any router's side effects."""

import inspect
import logging
from types import SimpleNamespace

import pytest
import torch

from dit_moe.checkpoint import layout, save_export
from dit_moe.diffusion import DrawSpec, ObjectiveConfig, build_objective
from dit_moe.models import DiT
from dit_moe.models.config import MoEArgs
from dit_moe.models.moe import ExpertsPerTokenMeter, MoEFeedForward
from dit_moe.models.router_expert_choice import UncalibratedRouter, expert_choice_routers
from dit_moe.models.router_sigmoid import SigmoidBiasRouter, register_expert_bias_update
from dit_moe.sampling import SamplingOptions
from dit_moe.sampling.prepare import SamplingRequest, prepare_sampling
from dit_moe.train import loop
from dit_moe.train.build import register_router_updates
from dit_moe.train.config import BatchPlan
from dit_moe.train.engine import EMA
from dit_moe.train.routers import ema_router_state, warn_if_routing_batch_changes
from dit_moe.utils.errors import UserError

from reference_dit import randomize_
from tiny_dit import tiny_config

EC = dict(in_channels=3, num_experts=4, num_experts_per_tok=2, router="expert-choice")


def digits_like(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Structured images in [-1, 1] (a class-dependent blob plus noise) and their labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (batch,), generator=g)
    grid = torch.linspace(-1, 1, 8)
    blob = torch.exp(-((grid.view(1, 8, 1) - (y.view(-1, 1, 1) / 5 - 0.9)) ** 2) * 4 - grid.view(1, 1, 8) ** 2 * 2)
    x = (2 * blob - 1).unsqueeze(1).expand(-1, 3, -1, -1) + 0.1 * torch.randn(batch, 3, 8, 8, generator=g)
    return x.clamp(-1, 1), y


def fake_run(model, ema, batch: int = 8):
    """What `ema_router_state` reads of a training run, for one process without DeepSpeed."""
    loader = (digits_like(batch, seed) for seed in range(1000))
    objective = build_objective("flow", learn_sigma=model.config.learn_sigma)
    spec = DrawSpec((3, 8, 8), model.config.class_dropout_prob, 0.0, model.num_tokens)
    return SimpleNamespace(
        engine=SimpleNamespace(module=model),
        ema=ema,
        loader=loader,
        codec=None,
        device=torch.device("cpu"),
        model_dtype=torch.float32,
        objective=objective,
        draw_spec=spec,
        plan=BatchPlan(batch, 1, 1),
        ranks=SimpleNamespace(world_size=1, positions=slice(None)),
        cfg=SimpleNamespace(run=SimpleNamespace(seed=0)),
        step=100,
    )


def training_forwards(model, run, count: int, seeds: int = 500) -> None:
    """`count` forwards of `model` on training inputs x_t (as the trainer draws them), no gradients."""
    for index in range(count):
        x0, y = digits_like(8, seeds + index)
        draws = run.objective.draw((1, seeds, index), 8, run.draw_spec, "cpu")
        with torch.no_grad():
            run.objective.process.training_losses(
                lambda x_t, t, y: model(x_t, t, y, force_drop_ids=draws.drop), x0, draws.t, dict(y=y), draws.noise
            )


def calibrated_model(**overrides):
    torch.manual_seed(0)
    model = randomize_(DiT(tiny_config(**{**EC, **overrides}))).train()
    training_forwards(model, fake_run(model, None), 6)
    return model.eval()


def test_uncalibrated_expert_choice_is_refused_in_eval_and_at_sampling(tmp_path):
    model = randomize_(DiT(tiny_config(**EC))).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([0, 1])
    with pytest.raises(UncalibratedRouter, match="no calibrated inference thresholds"):
        model(x, t, y)
    path = save_export(tmp_path / "ec.safetensors", model.config, model.state_dict(), objective=ObjectiveConfig("flow"))
    with pytest.raises(UserError, match="routing would depend on the batch"):
        prepare_sampling(SamplingRequest(path, vae_path="none", device="cpu"))


def test_expert_choice_image_does_not_depend_on_its_batch_and_its_experts_per_token_are_logged(tmp_path, caplog):
    model = calibrated_model()
    path = save_export(tmp_path / "ec.safetensors", model.config, model.state_dict(), objective=ObjectiveConfig("flow"))
    prepared = prepare_sampling(
        SamplingRequest(path, vae_path="none", device="cpu", options=SamplingOptions(cfg_scale=4.0, num_steps=4))
    )
    assert all(router.calibrated for router in expert_choice_routers(prepared.model).values())  # loaded with the file
    labels, seeds = [3, 1, 4, 1, 5, 9, 2, 6], list(range(10, 18))
    with caplog.at_level(logging.INFO, logger="dit_moe.sampling"):
        batch = prepared.sample(labels, seeds)
    assert "experts per token at sampling" in caplog.text
    for i in (0, 5):
        alone = prepared.sample([labels[i]], [seeds[i]])
        torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=1e-4)


def test_export_thresholds_are_calibrated_for_the_ema_weights_and_sample_as_training_routed():
    """The EMA's gate differs from the live one (scaled 3x here, as after a fast change of the gate):
    thresholds calibrated for the EMA route k = 2 experts per token on training inputs, within 10% in
    every layer; the live gate's thresholds (what exports held before) do not."""
    model = calibrated_model()
    live = {name: r.threshold.clone() for name, r in expert_choice_routers(model).items()}
    ema = EMA(SimpleNamespace(module=model, zero_optimization_stage=lambda: 0), 0.999)  # no ZeRO: whole tensors
    for name in ema.shadow:
        if name.endswith("gate.weight"):
            ema.shadow[name] *= 3
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    run = fake_run(model, ema)
    state = ema_router_state(run)
    assert sorted(state) == sorted(f"{n}.{b}" for n in live for b in ("threshold", "threshold_norm"))
    for name, router in expert_choice_routers(model).items():  # the live model is left as it was
        torch.testing.assert_close(router.threshold, live[name], rtol=0, atol=0)
        assert router.calibrated
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, weights[name], rtol=0, atol=0)

    def experts_per_token(thresholds):
        sampler = DiT(model.config)
        sampler.load_state_dict({**ema.shadow, **thresholds}, strict=False)
        sampler.eval()
        with ExpertsPerTokenMeter(sampler) as meter:
            training_forwards(sampler, run, 4, seeds=900)
        return meter.per_layer()

    assert all(a == pytest.approx(2, rel=0.1) for a in experts_per_token(state))
    live_state = {k: v for k, v in model.state_dict().items() if k.endswith(("threshold", "threshold_norm"))}
    assert not all(a == pytest.approx(2, rel=0.1) for a in experts_per_token(live_state))


def test_resume_with_another_per_rank_micro_batch_warns_for_expert_choice(caplog):
    shape = layout.RunShape(world_size=2, ep_size=1, zero_stage=2, global_batch=16, micro_batch=8, grad_accum=1)
    ec, topk = tiny_config(**EC), tiny_config(num_experts=4)
    with caplog.at_level(logging.WARNING, logger="dit_moe.train"):
        warn_if_routing_batch_changes(ec, shape, BatchPlan(8, 2, 1))  # same micro-batch on one process: exact
        warn_if_routing_batch_changes(topk, shape, BatchPlan(4, 1, 4))  # token choice does not depend on it
        assert caplog.text == ""
        warn_if_routing_batch_changes(ec, shape, BatchPlan(4, 1, 4))
    assert "changes from 8 to 4 samples" in caplog.text and "--micro-batch-size 8" in caplog.text


def test_sigmoid_bias_has_no_auxiliary_loss_unless_asked_and_says_so_at_start_up(caplog):
    assert MoEArgs(router="sigmoid-bias").aux_loss_coef == 0 and MoEArgs().aux_loss_coef == 0.01
    assert MoEArgs(router="sigmoid-bias", aux_loss_coef=1e-4).aux_loss_coef == 1e-4
    layer = MoEFeedForward(16, 64, MoEArgs(num_experts=4, router="sigmoid-bias")).train()
    assert layer(torch.randn(2, 3, 16))[1] == {}
    model = DiT(tiny_config(num_experts=4, router="sigmoid-bias"))
    engine = SimpleNamespace(module=model, basic_optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with caplog.at_level(logging.INFO, logger="dit_moe.train"):
        register_router_updates(engine)
    assert "load-balancing loss coefficient 0 " in caplog.text and "DeepSeek-V3 uses 1e-4" in caplog.text


def test_the_training_loop_names_no_router():
    source = inspect.getsource(loop)
    assert "router_sigmoid" not in source and "update_expert_bias" not in source


def sigmoid_model():
    torch.manual_seed(0)
    return randomize_(DiT(tiny_config(num_experts=4, router="sigmoid-bias"))).train()


def biases(model):
    return torch.stack([m.expert_bias for m in model.modules() if isinstance(m, SigmoidBiasRouter)])


def step_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(4, 4, 8, 8, generator=g),
        torch.rand(4, generator=g) * 999,
        torch.randint(0, 10, (4,), generator=g),
    )


def test_sigmoid_bias_updates_once_per_applied_optimizer_step_and_not_on_a_skipped_one():
    model = sigmoid_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    register_expert_bias_update(optimizer, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    u = model.config.moe.bias_update_rate

    scaler.scale(model(*step_inputs()).sum().mul(float("inf"))).backward()  # overflows: the scaler skips the step
    scaler.step(optimizer)
    scaler.update()
    assert biases(model).abs().sum() == 0
    optimizer.zero_grad()

    scaler.scale(model(*step_inputs(1)).square().mean()).backward()
    scaler.step(optimizer)
    scaler.update()
    moved = biases(model).clone()
    assert moved.abs().max() == pytest.approx(u) and moved.abs().sum() > 0
    optimizer.step()  # the engine stepping a second parameter group in the same step
    torch.testing.assert_close(biases(model), moved, rtol=0, atol=0)


@pytest.mark.parametrize("router", ["sigmoid-bias", "expert-choice"])
def test_gradient_checkpointing_counts_router_side_effects_once(router):
    states = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = randomize_(DiT(tiny_config(num_experts=4, router=router, grad_checkpointing=checkpointing))).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
        register_expert_bias_update(optimizer, model)
        for seed in range(2):
            optimizer.zero_grad()
            model(*step_inputs(seed)).square().mean().backward()
            optimizer.step()
        model(*step_inputs(2)).square().mean().backward()  # the counts of a step before its update
        states.append({k: v.clone() for k, v in model.state_dict().items() if "gate" in k})
        states[-1]["loads"] = [m.step_load.clone() for m in model.modules() if isinstance(m, SigmoidBiasRouter)]
    off, on = states
    assert sorted(off) == sorted(on)
    for key in off:
        torch.testing.assert_close(on[key], off[key])
    if router == "expert-choice":
        assert off["blocks.0.moe.gate.threshold_norm"].item() == pytest.approx(1 - 0.99**3)  # 3 forwards, not 6
    else:
        assert off["loads"][0].sum() == 4 * 16 * 2  # N T k copies, counted once
