"""dit-moe: class-conditional Diffusion Transformers with Mixture-of-Experts feed-forward layers."""

__version__ = "0.1.0"
