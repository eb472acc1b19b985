"""Build poisoned training sets and triggered test sets from clean ones."""

from __future__ import annotations

import torch

from robustkd.data.dataset import ImageDataset
from robustkd.errors import ConfigError
from robustkd.triggers import Trigger


def select_poison_indices(labels: torch.Tensor, target: int, ratio: float,
                          seed: int = 0) -> torch.Tensor:
    """``round(ratio * n_c)`` images of every non-target class ``c`` (at least one each)."""
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"poison ratio must be in (0, 1], got {ratio}")
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in torch.unique(labels).tolist():
        if cls == target:
            continue
        members = torch.nonzero(labels == cls).flatten()
        count = max(1, round(ratio * len(members)))
        chosen.append(members[torch.randperm(len(members), generator=gen)[:count]])
    if not chosen:
        raise ConfigError("no non-target images to poison")
    return torch.sort(torch.cat(chosen)).values


def poison_dataset(ds: ImageDataset, trigger: Trigger, target: int, ratio: float,
                   keep_originals: bool = True, seed: int = 0) -> ImageDataset:
    """Trigger a fraction of non-target images and relabel them to ``target``.

    With ``keep_originals`` (the authors' setting) the clean originals stay in the set and
    the poisoned copies are appended; otherwise the copies replace them.
    """
    if not 0 <= target < ds.num_classes:
        raise ConfigError(f"target class {target} is out of range for {ds.num_classes} classes")
    index = select_poison_indices(ds.labels, target, ratio, seed)
    poisoned = trigger.apply_uint8(ds.images[index])
    if keep_originals:
        images = torch.cat([ds.images, poisoned])
        labels = torch.cat([ds.labels, torch.full((len(index),), target, dtype=torch.int64)])
        is_poison = torch.cat([ds.is_poison, torch.ones(len(index), dtype=torch.bool)])
    else:
        images, labels, is_poison = ds.images.clone(), ds.labels.clone(), ds.is_poison.clone()
        images[index] = poisoned
        labels[index] = target
        is_poison[index] = True
    return ImageDataset(images, labels, list(ds.classes), name=f"{ds.name}+poison",
                        is_poison=is_poison)


def poison_target_class(ds: ImageDataset, trigger: Trigger, target: int, ratio: float,
                        seed: int = 0, tag: str = "clean-label") -> ImageDataset:
    """Clean-label poisoning: trigger ``ratio`` of the *target class's* images in place of
    the originals and keep every label, so the model learns the trigger as a feature of the
    target class and label inspection finds nothing."""
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"--poison-ratio must be in (0, 1] for {tag}, got {ratio}")
    members = torch.nonzero(ds.labels == target).flatten()
    if not len(members):
        raise ConfigError(f"{tag} poisons target-class images; class {target} has none")
    gen = torch.Generator().manual_seed(seed)
    count = max(1, round(ratio * len(members)))
    index = torch.sort(members[torch.randperm(len(members), generator=gen)[:count]]).values
    images, is_poison = ds.images.clone(), ds.is_poison.clone()
    images[index] = trigger.apply_uint8(ds.images[index])
    is_poison[index] = True
    return ImageDataset(images, ds.labels.clone(), list(ds.classes), name=f"{ds.name}+{tag}",
                        is_poison=is_poison)
