"""The images a command reads: in memory, or streamed from disk batch by batch, with one
rule (and one wording) for what needs the data in memory."""

from __future__ import annotations

from typing import Any

from robustkd.data import load_dataset, per_class_subset
from robustkd.data.dataset import DatasetSplits
from robustkd.data.registry import STREAMED
from robustkd.data.streaming import StreamedImageFolder, StreamedSplits, load_streamed
from robustkd.errors import ConfigError

IN_MEMORY_HINT = (
    "run it on in-memory data instead: tinyimagenet200 (the ImageNet stand-in), or an "
    "ImageFolder copy NAME/{train,test}/<class>/ of a subset of ImageNet's classes/images, "
    "loaded without --stream at a small --image-size (e.g. 64)")


def prepare_data(
    dataset: str,
    data_root: str | None,
    image_size: int | None,
    train_fraction: float | None,
    seed: int,
    download: bool = False,
    holdout: float | None = None,
) -> tuple[DatasetSplits, Any]:
    """The splits and the (per-class subset of the) training set, in memory."""
    splits = load_dataset(
        dataset, data_root, image_size=image_size, download=download, holdout=holdout
    )
    train = splits.train
    if train_fraction is not None and train_fraction < 1.0:
        train = per_class_subset(train, fraction=train_fraction, seed=seed)
    return splits, train


def run_data(meta: dict[str, Any], data_root: str | None, train_fraction: float | None = None,
             seed: int = 0) -> tuple[DatasetSplits, Any]:
    """:func:`prepare_data` for the dataset a run was trained on, as its ``meta.json`` records
    it (name, resize, holdout); ``data_root`` overrides the folder it was read from."""
    ds = meta["dataset"]
    return prepare_data(ds["name"], data_root or ds.get("data_root"), ds.get("resize"),
                        train_fraction, seed, holdout=ds.get("holdout"))


def streaming(dataset: str | None, stream: bool, parent_meta: dict | None = None) -> bool:
    """Whether a run streams its data from disk: asked for, the dataset is too big for memory
    (``imagenet``), or the run it continues from streamed (so a teacher's data pipeline,
    crop and normalisation carry over to its students)."""
    if stream or (parent_meta is not None and parent_meta["dataset"].get("streamed")):
        return True
    return dataset is not None and str(dataset).strip().lower() in STREAMED


def prepare_streamed(
    dataset: str,
    data_root: str | None,
    image_size: int | None,
    fraction: float | None,
    seed: int,
    holdout: float | None = None,
    normalization: dict[str, list[float]] | None = None,
) -> tuple[StreamedSplits, StreamedImageFolder]:
    """The streamed counterpart of :func:`prepare_data`: only file lists are read.

    ``image_size`` is the crop size (default 224); ``fraction`` keeps a per-class share of
    the training files by the same rule (and seed) as the in-memory ``per_class_subset``.
    ``normalization`` (a teacher run's ``mean``/``std``) replaces the ImageNet statistics, so
    a teacher trained on in-memory data sees inputs normalised as in its own training.
    """
    if holdout:
        raise not_streamable(
            "--holdout", "a validation split is carved from in-memory training data; evaluate "
            "on the streamed val/ split instead (omit --holdout)")
    if data_root is None:
        raise ConfigError(
            f"streamed dataset {dataset!r} needs --data-root DIR holding {dataset}/train/<class>/ "
            f"and {dataset}/val/<class>/ (or test/), or {dataset}.tar.gz")
    stats = {} if normalization is None else {k: normalization[k] for k in ("mean", "std")}
    splits = load_streamed(dataset, data_root, crop_size=image_size or 224, **stats)
    train = splits.train
    if fraction is not None and fraction < 1.0:
        train = per_class_subset(train, fraction=fraction, seed=seed)
    return splits, train


def not_streamable(what: str, hint: str) -> ConfigError:
    """One wording for everything that needs the data in memory, so users learn the rule."""
    return ConfigError(
        f"{what} is not supported with streamed data (--stream, or dataset imagenet): {hint}")
