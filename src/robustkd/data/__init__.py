"""Data layer: readers, cache, subsets and the device-side batch loader."""

from robustkd.data.dataset import DatasetSplits, ImageDataset
from robustkd.data.loader import DeviceLoader, normalize
from robustkd.data.registry import list_datasets, load_dataset
from robustkd.data.subsets import per_class_subset, split_validation

__all__ = [
    "DatasetSplits",
    "DeviceLoader",
    "ImageDataset",
    "list_datasets",
    "load_dataset",
    "normalize",
    "per_class_subset",
    "split_validation",
]
