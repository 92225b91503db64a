"""The command-line flags every sampling tool shares, and the `SamplingRequest` they describe.

    add_sampling_flags(parser)                       # --ckpt, --vae-path, --rf, --sampler, --cfg-scale, ...
    request = request_from_args(parser.parse_args())

Each flag has both spellings (`--cfg-scale` and `--cfg_scale`); the grid tool, the FID
sampler and the routing collector add only the flags of what they write.
"""

from __future__ import annotations

import argparse

from ..cli import DTYPES, add_weights_flag, flag, parse_bool
from ..diffusion.diffusers_schedulers import SOLVERS
from ..hub import dit_checkpoint_name
from ..models import DiT_models
from .images import SamplingOptions
from .prepare import SamplingRequest
from .step_cache import CacheSpec

# DiT's sample.py without --ckpt: its released DiT-XL/2 at 256 px, sd-vae-ft-mse, guidance 4.0
# (its 250 DDPM steps, seed 0 and eight ImageNet classes are the defaults here anyway).
DIT_ZERO_SETUP = dict(model="DiT-XL/2", image_size=256, vae="mse", cfg_scale=4.0)
SAMPLERS = ("ddpm", "ddim", "euler", "heun", *SOLVERS)


class _ObjectiveAction(argparse.Action):
    """Stores the objective `--objective NAME` or `--rf BOOL` asks for, and which of the two flags said it."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.objective = values
        namespace.objective_flag = "--rf" if option_string.startswith("--rf") else "--objective"


def _rf_objective(text: str) -> str:
    return "flow" if parse_bool(text) else "iddpm"


def parse_interval(text: str) -> tuple[float, float]:
    """`LO,HI` -> (LO, HI) with 0 <= LO < HI (HI may be inf)."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LO,HI (two numbers, e.g. 0.28,5.42)") from None
    if not 0 <= low < high:
        raise argparse.ArgumentTypeError(f"{text!r} needs 0 <= LO < HI")
    return low, high


def parse_cache(text: str) -> str:
    """`experts:N` or `none`, checked."""
    try:
        CacheSpec.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_sampling_flags(parser: argparse.ArgumentParser, zero_setup: bool = False) -> None:
    """The checkpoint, codec, objective, sampler, guidance, precision and device flags; with
    `zero_setup`, --ckpt may be left out and means DiT's released model (`DIT_ZERO_SETUP`)."""
    zero_help = (
        (
            " (default: DiT's released DiT-XL-2-{size}x{size}.pt for --image-size 256|512, downloaded "
            "once, with --vae mse and --cfg-scale 4.0 as DiT's sample.py)"
        )
        if zero_setup
        else ""
    )
    parser.add_argument(
        *flag("ckpt"),
        required=not zero_setup,
        default=None,
        help="official DiT .pt, feizc/DiT-MoE .pt, dit-moe export or DeepSpeed checkpoint directory, "
        f"or a release name (DiT-XL-2-256x256.pt, dit_moe_xl_8E2A.pt, ...){zero_help}",
    )
    add_weights_flag(parser)
    parser.add_argument(
        *flag("vae-path"),
        "--vae",
        dest="vae_path",
        default=None,
        help="diffusers AutoencoderKL folder, DiT's ema|mse (stabilityai/sd-vae-ft-ema|mse) or a "
        "Hugging Face id (fetched once into its cache), or 'none' for pixel space "
        "(default: none for 1/3-channel models)",
    )
    parser.add_argument(
        *flag("model"),
        choices=sorted(DiT_models),
        metavar="NAME",
        default=None,
        help="for DiT's command line: must match the checkpoint's architecture when given "
        "(`python -m dit_moe.models` lists the presets)",
    )
    parser.add_argument(
        *flag("image-size"), type=int, default=None, help="pixels; checked against the checkpoint and VAE"
    )
    parser.add_argument(*flag("num-classes"), type=int, default=None, help="checked against the checkpoint when given")
    parser.add_argument(
        *flag("num-experts-per-tok"),
        type=int,
        default=None,
        help="top-k override (feizc/DiT-MoE files do not record it; default 2)",
    )
    _add_objective_flags(parser)
    parser.add_argument(
        *flag("seed"), *flag("global-seed"), dest="seed", type=int, default=0, help="sample i uses seed + i"
    )
    parser.add_argument(*flag("dtype"), choices=sorted(DTYPES), default="fp32", help="bf16/fp16: CUDA autocast only")
    parser.add_argument(*flag("device"), default=None, help="default: cuda:LOCAL_RANK when a GPU is present, else cpu")


def _add_objective_flags(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(objective=None, objective_flag="--rf")
    parser.add_argument(
        *flag("rf"),
        action=_ObjectiveAction,
        type=_rf_objective,
        nargs="?",
        const="flow",
        metavar="BOOL",
        help="True: rectified-flow model; must agree with a checkpoint that records its objective",
    )
    parser.add_argument(
        *flag("objective"),
        action=_ObjectiveAction,
        choices=["iddpm", "flow"],
        help="the objective of a file without a config (default iddpm); must agree with one that records it",
    )
    _add_sampler_flags(parser)
    parser.add_argument(
        *flag("noise-schedule"),
        choices=["linear", "cosine"],
        default=None,
        help="IDDPM files that record no objective config: the beta schedule they were trained "
        "with (default linear); checkpoints that record it are sampled with theirs",
    )
    parser.add_argument(
        *flag("diffusion-steps"),
        type=int,
        default=None,
        help="IDDPM files that record no objective config: training steps (default 1000)",
    )


def _add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """The sampler, its steps, guidance (scale, channels, interval) and step caching."""
    parser.add_argument(
        *flag("sampler"),
        choices=SAMPLERS,
        default=None,
        help="default: ddpm (IDDPM models), euler (flow models); dpm++2m, dpm++3m, dpm++2m-sde (stochastic), unipc and "
        "deis (diffusers' solvers) serve both at a fraction of the evaluations (docs/sampling.md)",
    )
    parser.add_argument(
        *flag("num-sampling-steps"),
        type=int,
        default=None,
        help="default: 250 (IDDPM, ddpm/ddim), 50 (flow, euler/heun), 25 / 10 for the solvers",
    )
    parser.add_argument(
        *flag("guidance-interval"),
        type=parse_interval,
        default=None,
        metavar="LO,HI",
        help="guidance only at noise levels sigma in (LO, HI] (Kynkaanniemi et al. 2024; sigma of x_t/alpha_t: "
        "IDDPM sqrt((1-abar)/abar), flow t/(1-t)); the unconditional forward is skipped outside it",
    )
    parser.add_argument(
        *flag("cache"),
        type=parse_cache,
        default=None,
        metavar="experts:N",
        help="DiT-MoE step caching: recompute routed experts every N model evaluations, reuse them between",
    )
    parser.add_argument(
        *flag("cfg-scale"),
        type=float,
        default=None,
        help="classifier-free guidance; 1 disables it. Default: 7.0 for a DiT-MoE rectified-flow "
        "file (its sample.py applies 7.0 to them whatever --cfg-scale says), 4.0 (DiT's) when "
        "sample.py is given no --ckpt, else 1.5 (DiT-MoE's README command)",
    )
    parser.add_argument(
        *flag("cfg-channels"),
        type=int,
        default=None,
        help="guided prediction channels (default all; 3 = DiT's forward_with_cfg)",
    )


def request_from_args(args: argparse.Namespace) -> SamplingRequest:
    """The request parsed flags describe (`add_sampling_flags`); no --ckpt is DiT's zero-setup line."""
    ckpt, vae_path, cfg_scale = args.ckpt, args.vae_path, args.cfg_scale
    if ckpt is None:
        model, size = args.model or DIT_ZERO_SETUP["model"], args.image_size or DIT_ZERO_SETUP["image_size"]
        ckpt = dit_checkpoint_name(model, size)
        vae_path = DIT_ZERO_SETUP["vae"] if vae_path is None else vae_path
        cfg_scale = DIT_ZERO_SETUP["cfg_scale"] if cfg_scale is None else cfg_scale
    options = SamplingOptions(
        sampler=args.sampler,
        num_steps=args.num_sampling_steps,
        cfg_scale=cfg_scale,
        cfg_channels=args.cfg_channels,
        guidance_interval=args.guidance_interval,
        cache=None if args.cache == "none" else args.cache,
    )
    return SamplingRequest(
        ckpt,
        vae_path=vae_path,
        options=options,
        objective=args.objective,
        objective_flag=args.objective_flag,
        noise_schedule=args.noise_schedule,
        diffusion_steps=args.diffusion_steps,
        num_experts_per_tok=args.num_experts_per_tok,
        model_name=args.model,
        num_classes=args.num_classes,
        image_size=args.image_size,
        dtype=args.dtype,
        device=args.device,
        keep_freed_host_memory=True,  # parsed flags: the process is a command-line tool's own
        weights=args.weights,
    )
