"""The paper's teacher -> student pairs (Table 2), selectable by one name.

A pair names a registered teacher and student architecture, e.g. ``wrn28_4-wrn16_2``.
``robustkd distill --pair NAME`` sets the student from it and checks that the teacher run
really is the pair's teacher, so a grid of runs cannot silently mix up architectures.

All built-in models of a pair declare the same number of distillation layers (3 for the CIFAR
families, 4 for the ImageNet ones) at matching resolutions, so FKD pairs them one to one. FKD
refuses pairs whose counts differ (it does not guess which stages to drop); name the layers
explicitly for such pairs (``teacher_layers``/``student_layers``, CLI ``--teacher-layers``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from robustkd.errors import ConfigError
from robustkd.io import META_FILE, read_json
from robustkd.models.registry import build_model

PAPER_DATASETS = ("cifar100", "gtsrb", "flower17", "imagenet")


@dataclass(frozen=True)
class ModelPair:
    """A teacher and a student architecture (registry names) and what the pair is for."""

    name: str
    teacher: str
    student: str
    varies: str
    datasets: tuple[str, ...] = PAPER_DATASETS
    notes: str = ""
    in_paper: bool = True


_PAIRS = (
    ModelPair("wrn28_4-wrn16_4", "wrn28_4", "wrn16_4", "depth"),
    ModelPair("wrn28_4-wrn28_2", "wrn28_4", "wrn28_2", "width"),
    ModelPair("wrn28_4-wrn16_2", "wrn28_4", "wrn16_2", "depth and width",
              notes="CIFAR-100 in the paper: teacher ASR 96.14%; ASR FKD 90.17 (CKD) / "
                    "80.46 (LBA), RobustKD 4.32 / 2.67"),
    ModelPair("wrn28_4-resnet56", "wrn28_4", "resnet56", "architecture",
              notes="CIFAR-100 in the paper: teacher ASR 96.14%; ASR FKD 93.58 (CKD) / "
                    "72.84 (LBA), RobustKD 3.31 / 0.72"),
    ModelPair("pyramidnet200-wrn28_4", "pyramidnet200", "wrn28_4", "architecture",
              notes="PyramidNet-200: alpha 240, bottleneck blocks (26.8M parameters)"),
    ModelPair("pyramidnet200-pyramidnet110", "pyramidnet200", "pyramidnet110", "depth and width",
              notes="PyramidNet-110: alpha 84, basic blocks"),
    # Not in the paper's Table 2: the FKD paper's kind of ImageNet pairs, on our own models.
    ModelPair("imagenet_resnet50-imagenet_resnet18", "imagenet_resnet50", "imagenet_resnet18",
              "depth and block type", datasets=("imagenet",), in_paper=False,
              notes="224 px ImageNet models; 4 distillation layers each"),
    ModelPair("imagenet_resnet50-mobilenetv2", "imagenet_resnet50", "mobilenetv2",
              "architecture", datasets=("imagenet",), in_paper=False,
              notes="224 px ImageNet models; 4 distillation layers each, same resolutions"),
)
PAIRS: dict[str, ModelPair] = {p.name: p for p in _PAIRS}


def list_pairs(paper_only: bool = False) -> list[str]:
    """Pair names, the paper's Table 2 first."""
    return [p.name for p in _PAIRS if p.in_paper or not paper_only]


def get_pair(name: str) -> ModelPair:
    """The pair called ``name`` (case-insensitive; ``->`` works as the separator too)."""
    key = str(name).strip().lower().replace("->", "-")
    if key not in PAIRS:
        raise ConfigError(f"unknown model pair {name!r}; known pairs: {', '.join(PAIRS)}")
    return PAIRS[key]


def _fingerprint(arch: str, kwargs: dict[str, Any]) -> tuple:
    """Model type and every parameter/buffer shape, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_model(arch, **kwargs)
    return type(model).__name__, tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def same_architecture(arch: str, arch_kwargs: dict[str, Any] | None, expected: str) -> bool:
    """Whether a model recorded as ``arch``/``arch_kwargs`` is the registry model ``expected``.

    Equal names match directly; otherwise both are built shape-only and compared, so e.g.
    ``pyramidnet`` with depth 200, alpha 240 and bottlenecks counts as ``pyramidnet200``.
    """
    kwargs = dict(arch_kwargs or {})
    if arch == expected:
        return True
    try:
        classes = {k: kwargs[k] for k in ("num_classes", "in_channels") if k in kwargs}
        return _fingerprint(arch, kwargs) == _fingerprint(expected, classes)
    except (ConfigError, TypeError):
        return False


def check_teacher(pair: ModelPair, arch: str | None, arch_kwargs: dict[str, Any] | None,
                  where: str = "the teacher") -> None:
    """Raise ConfigError (naming the fix) unless ``arch`` is the pair's teacher."""
    if arch and same_architecture(arch, arch_kwargs, pair.teacher):
        return
    fitting = [p.name for p in _PAIRS if arch and same_architecture(arch, arch_kwargs, p.teacher)]
    hint = (f"pairs with that teacher: {', '.join(fitting)}" if fitting
            else "no pair has that teacher; pick the student with --student NAME instead")
    raise ConfigError(f"--pair {pair.name} needs a {pair.teacher} teacher, but {where} is "
                      f"{arch or 'not a built-in architecture'}; {hint}")


def check_teacher_run(pair: ModelPair, run_dir: str | Path) -> None:
    """:func:`check_teacher` on a run directory's ``meta.json`` (weights are not read)."""
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {META_FILE}); --pair needs "
                          "--teacher RUN_DIR of a `robustkd train` or `robustkd attack` run")
    meta = read_json(path)
    check_teacher(pair, meta.get("arch"), meta.get("arch_kwargs"), where=f"teacher run {run_dir}")
