"""DiT / DiT-MoE checkpoints as diffusers pipelines.

    python -m dit_moe.diffusers export --ckpt FILE --out DIR      # any checkpoint load_model reads

    pipe = DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)   # anywhere diffusers runs
    pipe = load_pipeline(DIR)                   # with dit-moe installed: its classes, no remote code

Files: transformer.py (the ModelMixin around the DiT), pipeline.py (the sampling loop), schedulers.py
(the objective's scheduler), labels.py (class names), bundle.py (the shipped single-file copies),
export.py (the folder), __main__.py (the command line).
"""

from .export import ExportRequest, build_pipeline, export_pipeline
from .load import load_pipeline
from .pipeline import DiTMoEPipeline
from .schedulers import scheduler_for
from .transformer import DiTMoETransformer2DModel

__all__ = [
    "DiTMoEPipeline",
    "DiTMoETransformer2DModel",
    "ExportRequest",
    "build_pipeline",
    "export_pipeline",
    "load_pipeline",
    "scheduler_for",
]
