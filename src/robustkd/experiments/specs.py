"""The paper's tables and figures as data: which runs each one needs and where they go.

A :class:`Study` names the attacks, student recipes and paper pairs of one table or figure;
:mod:`robustkd.experiments.plan` expands it, at a scale, into run nodes. A :class:`Recipe` is
how a column's student is made (a distillation method of :mod:`robustkd.distill` plus
RobustKD options or a teacher defence), named so a column is one word (``fkd``,
``robustkd`` ...). The ``robustkd`` column is the *paper* preset and is labelled so;
``robustkd distill`` with no flags runs ``DEFAULT_PRESET`` (the benchmark's
"RobustKD default" column).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from robustkd.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    """How a student is made from a (possibly backdoored) teacher."""

    name: str
    label: str
    method: str  # a distillation method of robustkd.distill / api.distill
    robustkd: dict[str, Any] | None = None
    defense: str | None = None
    defense_options: dict[str, Any] | None = None  # over the scale's defence sizes


RECIPES: dict[str, Recipe] = {m.name: m for m in (
    Recipe("fkd", "FKD", "fkd"),
    Recipe("kd", "KD", "kd"),
    Recipe("ce", "student only (CE)", "ce"),
    # the paper's literal reading: tau 0.2, Eq. 7, all layers, CE + variance (METHOD.md 5)
    Recipe("robustkd", "RobustKD (paper)", "robustkd", {"preset": "paper"}),
    # paper detox + trigger-consistent distillation (defenses/inversion.py; not in the paper)
    Recipe("robustkd-improved", "RobustKD (improved)", "robustkd", {"preset": "improved"}),
    # a candidate default: the student's online universal perturbation, no masks
    Recipe("robustkd-student-uap", "RobustKD (student UAP)", "robustkd",
           {"preset": "student-uap"}),
    Recipe("robustkd-student-uap-small", "RobustKD (student UAP, eps 0.05)", "robustkd",
           {"preset": "student-uap-small"}),
    # the student's perturbation as appended copies that learn their labels (clean rows
    # keep the whole FKD signal)
    Recipe("robustkd-student-uat", "RobustKD (student UAT)", "robustkd",
           {"preset": "student-uat"}),
    # the student pruned by ANP's criterion after FKD (the attacker cannot shape the
    # student's neurons), alone and after the default's teacher pruning
    Recipe("robustkd-student-prune", "RobustKD (student pruned)", "robustkd",
           {"preset": "student-prune"}),
    Recipe("robustkd-prune-both", "RobustKD (teacher and student pruned)", "robustkd",
           {"preset": "prune-both"}),
    # FKD's feature loss for the first half of the steps, then logit KD
    Recipe("robustkd-feature-warmup", "RobustKD (feature warm-up, then KD)", "robustkd",
           {"preset": "feature-warmup"}),
    # ANP's masks pruned as far as held-out clean accuracy allows, alone and then fine-tuned
    # with the pruned channels held at zero
    Recipe("robustkd-anp-prune-acc", "RobustKD (ANP pruning to an accuracy bound)",
           "robustkd", {"preset": "anp-prune-acc"}),
    Recipe("robustkd-anp-prune-ft", "RobustKD (ANP pruning to an accuracy bound + "
           "fine-tuning)", "robustkd", {"preset": "anp-prune-ft"}),
    # feature shift tuning of the teacher copy, then FKD (shares the `fst` column's runs)
    Recipe("robustkd-fst", "RobustKD (feature shift tuning)", "robustkd", {"preset": "fst"}),
    # the same, plus KD's soft targets from the original teacher's logits
    Recipe("robustkd-fst-logits", "RobustKD (FST + the original teacher's logits)",
           "robustkd", {"preset": "fst-logits"}),
    # the same tuned copy, FKD on mixup's blended batches
    Recipe("robustkd-fst-mixup", "RobustKD (FST + FKD on mixup batches)", "robustkd",
           {"preset": "fst-mixup"}),
    # no teacher cleaning: FKD on every layer but the deepest, plus KD's soft targets
    Recipe("robustkd-shallow-kd", "RobustKD (FKD without the deepest layer + KD)", "robustkd",
           {"preset": "shallow-kd"}),
    Recipe("robustkd-blind", "RobustKD (blind tau)", "robustkd",
           {"preset": "paper", "taus": [0.1, 0.2, 0.5, 1.0], "selection": "blind"}),
    Recipe("robustkd-oracle", "RobustKD (oracle tau)", "robustkd",
           {"preset": "paper", "taus": [0.1, 0.2, 0.5, 1.0], "selection": "oracle"}),
    Recipe("finetune", "fine-tuning + FKD", "fkd", defense="finetune"),
    Recipe("nad", "NAD + FKD", "fkd", defense="nad"),
    # fine-tuning that shifts the features (a new classifier turned away from the old one)
    Recipe("fst", "FST + FKD", "fkd", defense="fst"),
    # FST cross-fitted: two copies, each tuned on half the images, each image distilled
    # from the copy that never saw it (a tuned teacher is fitted to its tuning images)
    Recipe("crossfit", "cross-fitted FST + FKD", "fkd", defense="crossfit"),
    Recipe("anp", "ANP + FKD", "fkd", defense="anp"),
    # ANP's masks within issue 15's time budget (1.5x FKD): 150 mask batches, not 500
    Recipe("anp-short", "ANP (150 iterations) + FKD", "fkd", defense="anp",
           defense_options={"iterations": 150}),
    Recipe("ibau", "I-BAU + FKD", "fkd", defense="ibau"),
)}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown student recipe {name!r}; "
                          f"choose from {sorted(RECIPES)}") from None


_ALL4 = ("wrn28_4-wrn16_2", "wrn28_4-resnet56", "pyramidnet200-wrn28_4",
         "pyramidnet200-pyramidnet110")
_PYR = ("pyramidnet200-wrn28_4", "pyramidnet200-pyramidnet110")
PAPER_PAIRS = {"cifar100": _ALL4, "gtsrb": _ALL4, "flower17": _PYR, "imagenet": _PYR}

# Our datasets that stand in for the paper's where the paper's is not available offline.
STAND_INS = {"cifar10": "cifar100", "tinyimagenet200": "imagenet", "digits": "cifar100"}


@dataclass(frozen=True)
class Study:
    """One table or figure of the paper.

    ``kind``: ``table`` (rows = dataset x pair, columns = attack x method), ``sweep`` (one
    RobustKD option varied, one series per attack, FKD as reference) or ``scan`` (feature
    variance of clean vs backdoored teachers). ``metrics`` are the numbers shown.
    """

    name: str
    title: str
    kind: str
    attacks: tuple[str, ...]
    methods: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ("acc", "asr")
    pairs: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(PAPER_PAIRS))
    sweep_option: str | None = None
    sweep_values: tuple[Any, ...] = ()
    teacher_columns: tuple[str, ...] = ("teacher_acc",)
    notes: str = ""


_SIMILAR = {"cifar100": ("wrn28_4-wrn16_4", "wrn28_4-wrn28_2")}
_FIG_PAIR = {"cifar100": ("wrn28_4-wrn16_4",)}

STUDIES: dict[str, Study] = {s.name: s for s in (
    Study("table3", "Table 3: do backdoors survive feature distillation (FKD student ACC / ASR)",
          "table", attacks=("ckd", "lba", "htba"), methods=("fkd",)),
    Study("table4", "Table 4: student ASR, FKD vs RobustKD", "table",
          attacks=("ckd", "lba"), methods=("fkd", "robustkd", "robustkd-improved"),
          metrics=("asr",), teacher_columns=("teacher_asr",)),
    Study("table5", "Table 5: student ACC, FKD vs RobustKD", "table",
          attacks=("ckd", "lba"), methods=("fkd", "robustkd", "robustkd-improved"),
          metrics=("acc",)),
    Study("table6", "Table 6: similar teacher/student architectures", "table",
          attacks=("ckd", "lba"), methods=("fkd", "robustkd"), pairs=_SIMILAR,
          teacher_columns=("teacher_acc", "teacher_asr")),
    Study("table7", "Table 7: adaptive CKD (CKD + low feature variance) against RobustKD",
          "table", attacks=("adaptive-ckd",), methods=("fkd", "robustkd"),
          pairs={"cifar100": ("wrn28_4-wrn16_4", "wrn28_4-wrn28_2", "wrn28_4-wrn16_2",
                              "wrn28_4-resnet56")},
          teacher_columns=("teacher_acc", "teacher_asr")),
    Study("fig2", "Fig. 2: per-example feature variance, clean vs backdoored teachers",
          "scan", attacks=("ckd", "lba", "badnets"), pairs={"cifar100": ("wrn28_4-wrn16_2",)},
          metrics=("variance",)),
    Study("fig4", "Fig. 4: mask threshold tau", "sweep", attacks=("ckd", "lba"),
          methods=("robustkd",), pairs=_FIG_PAIR, sweep_option="tau",
          sweep_values=(0.1, 0.2, 0.6, 1.0)),
    Study("fig5", "Fig. 5: mask method, Eq. 7 vs Eq. 15", "sweep", attacks=("ckd", "lba"),
          methods=("robustkd",), pairs=_FIG_PAIR, sweep_option="variant",
          sweep_values=("eq7", "eq15")),
    Study("fig6", "Fig. 6: detox loss, CE + variance vs variance only vs CE only", "sweep",
          attacks=("ckd", "lba"), methods=("robustkd",), pairs=_FIG_PAIR,
          sweep_option="loss", sweep_values=("ce+var", "var", "ce")),
    Study("fig7", "Fig. 7: detoxified layers, last / last two / all", "sweep",
          attacks=("ckd", "lba"), methods=("robustkd",), pairs=_FIG_PAIR,
          sweep_option="layers", sweep_values=("last", "last2", "all")),
)}


def get_study(name: str) -> Study:
    try:
        return STUDIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown table/figure {name!r}; choose from {sorted(STUDIES)} or 'all'"
        ) from None
