"""Training data: built-in digits, image folders, pre-extracted latents (webdataset shards or fast-DiT .npy).

The trainer needs only `DataConfig`, `build_train_loader` and `build_codec`.
"""

from dit_moe.data.config import DATASETS, DataConfig
from dit_moe.data.digits import DigitsDataset, digits_arrays
from dit_moe.data.folder import ImageFolderDataset
from dit_moe.data.latents import LatentShardStream
from dit_moe.data.loader import DataInfo, MapTrainLoader, ShardTrainLoader, TrainLoader, build_codec, build_train_loader
from dit_moe.data.npy_features import NpyFeatureDataset

__all__ = [
    "DATASETS",
    "DataConfig",
    "DataInfo",
    "DigitsDataset",
    "ImageFolderDataset",
    "LatentShardStream",
    "MapTrainLoader",
    "NpyFeatureDataset",
    "ShardTrainLoader",
    "TrainLoader",
    "build_codec",
    "build_train_loader",
    "digits_arrays",
]
