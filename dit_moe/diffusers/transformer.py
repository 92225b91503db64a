"""DiT / DiT-MoE as a diffusers model: `DiTMoETransformer2DModel` (ModelMixin + ConfigMixin).

It wraps dit_moe's DiT unchanged (dense, top-k, expert-choice, sigmoid-bias routers, fine-grained
and shared experts, MaskDiT decoders), so its output is the DiT's, bit for bit. Its config.json
holds the whole DiTConfig as `dit_config`; its weights are the DiT's state dict under `dit.`
(diffusers' `diffusion_pytorch_model.safetensors`, sharded with an index above `max_shard_size`).

`timestep` is what the DiT was trained to see: IDDPM models the original-process index 0..T-1,
flow models t * flow_t_scale with t in [0, 1]. DiTMoEPipeline converts its scheduler's timesteps.

Cost at scale: diffusers has no expert parallelism, so one process holds every expert; for
DiT-MoE-G/2 16E2A (16.5B parameters) that is 66 GB in fp32, 33 GB in bf16 (one 80 GB GPU), and
`enable_model_cpu_offload` moves the whole transformer at once (`_no_split_modules` keeps a block
with its experts on one device under a device map).
"""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from ..models.config import DiTConfig
from ..models.dit import DiT
from ..models.router_expert_choice import expert_choice_routers


class DiTMoETransformer2DModel(ModelMixin, ConfigMixin, CacheMixin):
    r"""A DiT / DiT-MoE with diffusers' loading, saving, offloading and caches; `dit` is the model itself.

    Caches (`enable_cache`): those that hook modules by name and cache tensor outputs fit the
    attention layers, e.g. `TaylorSeerCacheConfig(cache_identifiers=[r"dit\.blocks\.\d+\.attn"])`.
    Block-level caches (FirstBlockCache, MagCache) expect blocks registered with diffusers that take
    `hidden_states` and return it; a DiT block takes (x, c) and returns (x, MoE aux losses), and an
    MoE layer's routing depends on each step's tokens, so it is recomputed at every step.
    """

    _no_split_modules = ["DiTBlock"]
    # Layerwise casting leaves these in the compute dtype: embeddings and the routers' gates (fp32 logits).
    _skip_layerwise_casting_patterns = ["x_embedder", "t_embedder", "y_embedder", "pos_embed", "gate"]

    @register_to_config
    def __init__(self, dit_config: dict):
        super().__init__()
        self.dit = DiT(DiTConfig.from_dict(dict(dit_config)))

    @classmethod
    def from_dit(cls, model: DiT) -> "DiTMoETransformer2DModel":
        """Wrap an existing DiT (weights shared, nothing copied)."""
        with torch.device("meta"):
            wrapper = cls(dit_config=model.config.to_dict())
        wrapper.dit = model
        return wrapper

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """diffusers' from_pretrained, then every weight copied into its own allocation.

        diffusers keeps the tensors where the safetensors buffer put them (8-byte aligned offsets);
        CPU BLAS kernels round differently on such addresses than on the allocator's 64-byte aligned
        ones, so without the copy the MoE experts' outputs differ from `load_model`'s in the last bit.
        """
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model._apply(lambda tensor: tensor.clone())
        for router in expert_choice_routers(model.dit).values():  # diffusers loads without load_state_dict's hooks
            router.note_loaded_thresholds()
        return loaded

    @property
    def dit_config(self) -> DiTConfig:
        return self.dit.config

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.Tensor,
        return_dict: bool = True,
    ):
        """x (N, C, H, W), timestep () or (N,), class labels (N,) -> `Transformer2DModelOutput(sample=(N, C_out, H, W))`."""
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(hidden_states.shape[0])
        sample = self.dit(hidden_states, timestep, class_labels)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)
