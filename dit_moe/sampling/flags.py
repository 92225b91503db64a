"""The command-line flags every sampling tool shares, and the `SamplingRequest` they describe.

    add_sampling_flags(parser)                       # --ckpt, --vae-path, --rf, --sampler, --cfg-scale, ...
    request = request_from_args(parser.parse_args())

Each flag has both spellings (`--cfg-scale` and `--cfg_scale`); the grid tool, the FID
sampler and the routing collector add only the flags of what they write.
"""

from __future__ import annotations

import argparse

from ..cli import DTYPES, flag, parse_bool
from ..models import DiT_models
from ..vae import dit_vae_flag
from .images import SamplingOptions
from .prepare import SamplingRequest

SAMPLERS = ("ddpm", "ddim", "euler", "heun")


class _ObjectiveAction(argparse.Action):
    """Stores the objective `--objective NAME` or `--rf BOOL` asks for, and which of the two flags said it."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.objective = values
        namespace.objective_flag = "--rf" if option_string.startswith("--rf") else "--objective"


def _rf_objective(text: str) -> str:
    return "flow" if parse_bool(text) else "iddpm"


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The checkpoint, codec, objective, sampler, guidance, precision and device flags."""
    parser.add_argument(*flag("ckpt"), required=True,
                        help="official DiT .pt, feizc/DiT-MoE .pt, dit-moe export or DeepSpeed checkpoint directory")
    parser.add_argument(*flag("vae-path"), default=None,
                        help="diffusers AutoencoderKL folder, or 'none' for pixel space "
                             "(default: none for 1/3-channel models)")
    parser.add_argument("--vae", dest="vae_path", type=dit_vae_flag, default=argparse.SUPPRESS,
                        help="DiT's flag: 'none' or a local AutoencoderKL folder (ema/mse would download: use --vae-path)")
    parser.add_argument(*flag("model"), choices=sorted(DiT_models), metavar="NAME", default=None,
                        help="for DiT's command line: must match the checkpoint's architecture when given")
    parser.add_argument(*flag("image-size"), type=int, default=None, help="pixels; checked against the checkpoint and VAE")
    parser.add_argument(*flag("num-classes"), type=int, default=None, help="checked against the checkpoint when given")
    parser.add_argument(*flag("num-experts-per-tok"), type=int, default=None,
                        help="top-k override (feizc/DiT-MoE files do not record it; default 2)")
    _add_objective_flags(parser)
    parser.add_argument(*flag("seed"), *flag("global-seed"), dest="seed", type=int, default=0,
                        help="sample i uses seed + i")
    parser.add_argument(*flag("dtype"), choices=sorted(DTYPES), default="fp32", help="bf16/fp16: CUDA autocast only")
    parser.add_argument(*flag("device"), default=None, help="default: cuda:LOCAL_RANK when a GPU is present, else cpu")


def _add_objective_flags(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(objective=None, objective_flag="--rf")
    parser.add_argument(*flag("rf"), action=_ObjectiveAction, type=_rf_objective, nargs="?", const="flow",
                        metavar="BOOL", help="True: rectified-flow model; must agree with a checkpoint that records its objective")
    parser.add_argument(*flag("objective"), action=_ObjectiveAction, choices=["iddpm", "flow"],
                        help="the objective of a file without a config (default iddpm); must agree with one that records it")
    parser.add_argument(*flag("sampler"), choices=SAMPLERS, default=None,
                        help="default: ddpm (IDDPM models), euler (flow models)")
    parser.add_argument(*flag("num-sampling-steps"), type=int, default=None, help="default: 250 (IDDPM), 50 (flow)")
    parser.add_argument(*flag("cfg-scale"), type=float, default=None,
                        help="classifier-free guidance; 1 disables it. Default: 7.0 for a DiT-MoE rectified-flow "
                             "file (its sample.py applies 7.0 to them whatever --cfg-scale says), else 1.5 "
                             "(DiT-MoE's README command; DiT's sample.py uses 4.0)")
    parser.add_argument(*flag("cfg-channels"), type=int, default=None,
                        help="guided prediction channels (default all; 3 = DiT's forward_with_cfg)")
    parser.add_argument(*flag("noise-schedule"), choices=["linear", "cosine"], default=None,
                        help="IDDPM files that record no objective config: the beta schedule they were trained "
                             "with (default linear); checkpoints that record it are sampled with theirs")
    parser.add_argument(*flag("diffusion-steps"), type=int, default=None,
                        help="IDDPM files that record no objective config: training steps (default 1000)")


def request_from_args(args: argparse.Namespace) -> SamplingRequest:
    """The request parsed flags describe (`add_sampling_flags`)."""
    options = SamplingOptions(
        sampler=args.sampler, num_steps=args.num_sampling_steps, cfg_scale=args.cfg_scale,
        cfg_channels=args.cfg_channels,
    )
    return SamplingRequest(
        args.ckpt, vae_path=args.vae_path, options=options, objective=args.objective,
        objective_flag=args.objective_flag, noise_schedule=args.noise_schedule, diffusion_steps=args.diffusion_steps, num_experts_per_tok=args.num_experts_per_tok, model_name=args.model,
        num_classes=args.num_classes, image_size=args.image_size, dtype=args.dtype, device=args.device,
    )
