"""RobustKD as a teacher transform (``--method robustkd``): prune a copy of the teacher when
the configuration says so, detoxify its features, distil from the detoxified teacher
(:func:`run_robustkd`), and keep what another student may reuse: the masks and synthetic
triggers as ``detox.safetensors`` + ``detox.json``, the pruned teacher under ``prune/``
(``--detox-from RUN_DIR``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from safetensors.torch import load_file
from torch import nn

from robustkd.defenses.detox import DetoxMasks
from robustkd.defenses.inversion import SyntheticTriggers
from robustkd.defenses.registry import load_defended
from robustkd.defenses.robustkd import RobustKDConfig, SavedDetox, robustkd_config, run_robustkd
from robustkd.defenses.transforms import (
    TransformContext,
    Transformed,
    register_transform,
)
from robustkd.errors import ConfigError
from robustkd.evaluation.metrics import evaluate_model
from robustkd.io import read_json, save_tensors, write_json
from robustkd.models.taps import tap

DETOX_FILE = "detox.safetensors"
DETOX_META = "detox.json"
PRUNE_DIR = "prune"  # the pruned teacher's weights and report (registry.defend_teacher)
STUDENT_PRUNE_DIR = "prune-student"  # the same for the student's pruning (resume only)


def load_detox(run_dir: str | Path) -> tuple[DetoxMasks | None, SyntheticTriggers | None]:
    """The detox masks and synthetic triggers (each where the run had them) a RobustKD run
    saved, for reuse."""
    run_dir = Path(run_dir)
    if not (run_dir / DETOX_FILE).exists() or not (run_dir / DETOX_META).exists():
        raise ConfigError(
            f"{run_dir} has no {DETOX_FILE}/{DETOX_META}; give the run directory of an earlier "
            "`robustkd distill --method robustkd`"
        )
    tensors = load_file(str(run_dir / DETOX_FILE))
    meta = read_json(run_dir / DETOX_META)
    masks = DetoxMasks.from_saved(meta, tensors) if "names" in meta else None
    return masks, SyntheticTriggers.from_tensors(tensors)


@dataclass(frozen=True)
class Detoxification:
    """Detox masks (trained, or reused from ``detox_from``), then FKD from the teacher seen
    through them; the record gains ``robustkd`` (the report, the configuration and the
    detoxified teacher's metrics), ``selection``, ``chosen_tau`` and the seconds of each
    step."""

    name: str = "robustkd"
    chosen_by: ClassVar[str] = "method"
    options_key: ClassVar[str] = "robustkd"
    distils_with: ClassVar[str | None] = "fkd"

    def check(self, options: Mapping[str, Any] | None) -> RobustKDConfig:
        return robustkd_config(options)

    def unchosen(self, settings: Mapping[str, Any]) -> str:
        return (f"detoxification options only apply to --method {self.name}, not "
                f"{settings.get('method')}")

    def __call__(self, ctx: TransformContext) -> Transformed:
        s = ctx.settings
        cfg = self.check(s.get(self.options_key))
        reuse = None
        if s.get("detox_from") is not None:
            reuse = SavedDetox(*load_detox(s["detox_from"]),
                               pruned=saved_pruning(ctx.teacher, s["detox_from"], cfg))
        report = run_robustkd(
            ctx.teacher, ctx.student, ctx.clean, ctx.test, cfg, loop=ctx.loop, run=ctx.run,
            fkd_options=s.get("options"), teacher_layers=s.get("teacher_layers"),
            student_layers=s.get("student_layers"), student_factory=ctx.new_student,
            reuse=reuse, prune_dir=ctx.run_dir / PRUNE_DIR,
            student_prune_dir=ctx.run_dir / STUDENT_PRUNE_DIR)
        teacher, pruning = report.pop("teacher"), report.pop("prune")
        student_pruning = report.pop("student_prune", None)  # the oracle selection: none
        masks = report.pop("masks")
        synthetic = report.pop("synthetic_triggers")
        save_tensors(ctx.run_dir / DETOX_FILE,
                     {**(masks.tensors() if masks is not None else {}),
                      **(synthetic.tensors() if synthetic is not None else {})})
        write_json(ctx.run_dir / DETOX_META,
                   {**(masks.config() if masks is not None else {}), "config": cfg.as_dict(),
                    "teacher": str(s.get("teacher"))})
        loop, run = ctx.loop, ctx.run
        measured = pruning.get("cleaned_teacher_metrics") if pruning is not None else None
        if masks is None and measured is not None:
            # nothing replaces the pruned teacher's outputs: the pruning measured this teacher
            detoxed = measured
        else:
            replace = masks.replacements() if masks is not None else {}
            with tap(teacher, replace=replace):
                detoxed = evaluate_model(teacher, ctx.test, loop.mean, loop.std,
                                         trigger=run.trigger, target=run.target,
                                         device=loop.device)
        extras = {
            "robustkd": {**report, "config": cfg.as_dict(), "prune": pruning,
                         "detoxified_teacher_metrics": detoxed},
            **{k: report[k] for k in ("selection", "chosen_tau", "detox_seconds",
                                      "distill_seconds")},
            "prune_seconds": pruning["seconds"] if pruning is not None else 0.0,
            "student_prune_seconds": (student_pruning["seconds"]
                                      if student_pruning is not None else 0.0),
        }
        extras["robustkd"]["student_prune"] = student_pruning
        notes = []
        if pruning is not None and "pruned" in pruning:
            notes.append(f"pruned {pruning.get('pruned')} of {pruning.get('channels')} teacher "
                         f"channels ({cfg.prune}); pruned teacher "
                         f"{pruning['cleaned_teacher_metrics']}")
        elif pruning is not None:
            notes.append(f"teacher copy cleaned by {cfg.prune}: "
                         f"{pruning['cleaned_teacher_metrics']}")
        if student_pruning is not None:
            notes.append(f"pruned {student_pruning.get('pruned')} of "
                         f"{student_pruning.get('channels')} student channels "
                         f"({cfg.prune_student})")
        return Transformed(teacher, extras, "; ".join(notes) or None)


def saved_pruning(teacher: nn.Module, run_dir: str | Path, cfg: RobustKDConfig
                  ) -> tuple[nn.Module, dict[str, Any]] | None:
    """The pruned teacher (and the pruning's report) an earlier run saved under ``prune/``
    with the settings of ``cfg``; None when ``cfg`` prunes nothing."""
    if cfg.prune == "none":
        return None
    saved = load_defended(Path(run_dir) / PRUNE_DIR, teacher, cfg.prune, cfg.prune_options())
    if saved is None:
        raise ConfigError(f"{run_dir} has no teacher pruned with {cfg.prune} and these "
                          f"settings under {PRUNE_DIR}/; give the run directory of a "
                          "`robustkd distill --method robustkd` with the same preset")
    return saved


register_transform(Detoxification())
