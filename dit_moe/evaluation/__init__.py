"""Evaluation: ADM-format sample batches, FID / IS / precision-recall, and the digits quality score.

    from dit_moe.evaluation import write_npz, read_npz, evaluate, frechet_distance, DigitsScorer

Command line: `python -m dit_moe.evaluation {fid,stats,digits} ...` (see `__main__.py`).
"""

from .digits_score import DigitsScorer, images_to_digit_inputs
from .fid import (
    FeatureStatistics,
    InceptionDetector,
    evaluate,
    frechet_distance,
    inception_score,
    precision_recall,
    save_reference_statistics,
)
from .npz import (
    NpzBatch,
    iter_npz_images,
    npz_from_png_folder,
    png_name,
    read_npz,
    to_uint8_nhwc,
    write_npz,
    write_statistics,
)

__all__ = [
    "DigitsScorer",
    "FeatureStatistics",
    "InceptionDetector",
    "NpzBatch",
    "evaluate",
    "frechet_distance",
    "images_to_digit_inputs",
    "iter_npz_images",
    "inception_score",
    "npz_from_png_folder",
    "png_name",
    "precision_recall",
    "read_npz",
    "save_reference_statistics",
    "to_uint8_nhwc",
    "write_npz",
    "write_statistics",
]
