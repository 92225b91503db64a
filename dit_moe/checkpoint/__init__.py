"""Checkpoints: every readable format, architecture and objective inference, the tag layout, exports.

    from dit_moe.checkpoint import load_model
    model = load_model(path)    # official DiT .pt, feizc/DiT-MoE .pt, our exports, DeepSpeed checkpoint dirs

`read` owns the file formats, `infer` what a file without a config says about itself, `layout`
the names inside a training run's checkpoints/ dir, `export` the one-file export.
"""

from ..utils.errors import CheckpointError
from .export import EXPORT_FORMAT, dit_moe_layout, save_export
from .infer import infer_config, objective_evidence
from .load import LoadedModel, load_checkpoint_model, load_model
from .provenance import ObjectiveSource, TrainedAs
from .read import CheckpointContents, read_checkpoint_file
from .record import RecordedRun, record_of_contents, record_of_tag

__all__ = [
    "EXPORT_FORMAT",
    "CheckpointContents",
    "CheckpointError",
    "LoadedModel",
    "ObjectiveSource",
    "RecordedRun",
    "TrainedAs",
    "dit_moe_layout",
    "infer_config",
    "load_checkpoint_model",
    "load_model",
    "objective_evidence",
    "read_checkpoint_file",
    "record_of_contents",
    "record_of_tag",
    "save_export",
]
