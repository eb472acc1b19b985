"""Expand a study, at a scale, into the runs it needs - each run computed once.

A :class:`RunNode` is one API call (``train``, ``attack``, ``distill`` or ``scan``) with its
parameters and its parent runs. Its id is a readable label plus a hash of everything that
determines its result (kind, parameters, parents' ids), so two tables that need the same
clean teacher or the same backdoored teacher get the same node, and a changed setting gets
a new run directory instead of silently reusing an old one. The data root and the device
are not part of the identity (same data, same computation).

A :class:`Cell` says where a node's numbers go in a table or figure.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from robustkd.defenses.registry import get_teacher_defense
from robustkd.defenses.robustkd import (
    DEFAULT_PRESET,
    PRESETS,
    foreign_prune_settings,
    robustkd_config,
)
from robustkd.errors import ConfigError
from robustkd.experiments.scales import DataScale, Scale
from robustkd.experiments.specs import STAND_INS, Recipe, Study, get_recipe


@dataclass(eq=False)
class RunNode:
    """One run: ``kind`` names the API function, ``parents`` map a parameter to a run."""

    kind: str
    label: str
    params: dict[str, Any]
    parents: dict[str, RunNode] = field(default_factory=dict)
    # bumped with the computation behind unchanged parameters (a defence's default fixed):
    # part of the identity only from 2 on, so every earlier id stays what it was
    revision: int = 1

    def __post_init__(self) -> None:
        identity = {"kind": self.kind, "params": self.params,
                    "parents": {k: p.id for k, p in sorted(self.parents.items())}}
        if self.revision > 1:
            identity["revision"] = self.revision
        blob = json.dumps(identity, sort_keys=True, default=str).encode()
        self.digest = hashlib.sha1(blob).hexdigest()[:10]
        self.id = f"{self.label}-{self.digest}"

    def spec(self) -> dict[str, Any]:
        """What is stored beside the run (``node.json``) and in every result line."""
        spec = {"id": self.id, "kind": self.kind, "params": self.params,
                "parents": {k: p.id for k, p in self.parents.items()}}
        return spec if self.revision == 1 else {**spec, "revision": self.revision}


@dataclass(frozen=True)
class Cell:
    """Where one run's numbers go: ``row`` (dataset, paper pair), ``column`` a table key
    such as ``fkd/ckd`` or ``teacher/ckd`` (sweeps: ``<attack>/<value>``)."""

    study: str
    dataset: str
    paper_dataset: str
    paper_pair: str
    pair: str
    column: str
    seed: int
    node: RunNode


class Planner:
    """Builds nodes for one scale, sharing identical nodes through a cache."""

    def __init__(self, scale: Scale) -> None:
        self.scale = scale
        self._nodes: dict[str, RunNode] = {}

    def _node(self, kind: str, label: str, params: dict[str, Any],
              parents: dict[str, RunNode] | None = None) -> RunNode:
        node = RunNode(kind, label, params, parents or {}, defence_revision(params))
        return self._nodes.setdefault(node.id, node)

    def clean_teacher(self, dataset: str, model: str, seed: int) -> RunNode:
        d = self.scale.for_dataset(dataset)
        return self._node("train", f"{dataset}-{model}-clean-s{seed}", {
            "dataset": dataset, "model": model, "epochs": d.teacher_epochs,
            "lr": d.teacher_lr, "schedule": d.teacher_schedule, "batch_size": d.batch_size,
            "train_fraction": d.train_fraction, "image_size": d.image_size, "seed": seed,
            "eval_every": d.teacher_epochs,
        })

    def attacked_teacher(self, teacher: RunNode, attack: str, seed: int) -> RunNode:
        d = self._data(teacher)
        options = dict(self.scale.attack_options.get(attack, {}))
        return self._node("attack", teacher.label.replace("-clean-", f"-{attack}-"), {
            "attack": attack, "target": 0, "epochs": d.attack_epochs, "lr": d.attack_lr,
            "poison_ratio": d.poison_ratio, "train_fraction": d.train_fraction,
            "batch_size": d.batch_size, "options": options, "seed": seed,
            "eval_every": d.attack_epochs,
        }, {"teacher": teacher})

    def student(self, teacher: RunNode, student_model: str, method: Recipe, seed: int,
                robustkd_overrides: dict[str, Any] | None = None, tag: str = "") -> RunNode:
        d = self._data(teacher)
        params: dict[str, Any] = {
            "method": method.method, "student": student_model, "epochs": d.student_epochs,
            "lr": d.student_lr, "schedule": d.student_schedule, "batch_size": d.batch_size,
            "clean_fraction": d.clean_fraction, "seed": seed, "eval_every": d.student_epochs,
        }
        params.update(method_params(method, d.detox_epochs,
                                    {**self.scale.robustkd_sizes, **(robustkd_overrides or {})},
                                    self.scale.defense_sizes))
        label = teacher.label.rsplit("-s", 1)[0] + f"-{student_model}-{method.name}{tag}-s{seed}"
        return self._node("distill", label, params, {"teacher": teacher})

    def scan(self, model: RunNode, reference: RunNode | None, seed: int) -> RunNode:
        parents = {"model_dir": model}
        if reference is not None:
            parents["reference"] = reference
        return self._node("scan", model.label + "-scan",
                          {"samples": self.scale.scan_samples, "seed": seed}, parents)

    def _data(self, node: RunNode) -> DataScale:
        while node.kind != "train":
            node = node.parents["teacher"]
        return self.scale.for_dataset(node.params["dataset"])


def defence_revision(params: dict[str, Any]) -> int:
    """The highest revision among the teacher defences a run's parameters make it run: its
    ``defense``, or a RobustKD configuration's teacher or student pruning (1 with none)."""
    robustkd = params.get("robustkd") or {}
    names = [params.get("defense"), robustkd.get("prune"), robustkd.get("prune_student")]
    return max((get_teacher_defense(n).revision for n in names if n and n != "none"),
               default=1)


def method_params(method: Recipe, detox_epochs: int, robustkd_sizes: dict[str, Any],
                  defense_sizes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The distill parameters a method adds: its RobustKD options or its teacher defence."""
    params: dict[str, Any] = {}
    if method.robustkd is not None:
        # a preset's values are spelled out, so a changed preset is a new run, not a
        # stale record (the literal "paper" preset is empty and keeps its ids)
        preset = PRESETS.get(method.robustkd.get("preset", DEFAULT_PRESET), {})
        own = {**preset, **method.robustkd}
        # a scale's sizes of one teacher defence do not apply to another
        foreign = foreign_prune_settings(own.get("prune", "none"))
        robustkd_sizes = {k: v for k, v in robustkd_sizes.items() if k not in foreign}
        params["robustkd"] = {**own, "detox_epochs": detox_epochs, **robustkd_sizes}
    if method.defense is not None:
        params["defense"] = method.defense
        params["defense_options"] = {**defense_sizes.get(method.defense, {}),
                                     **(method.defense_options or {})}
    return params


def _is_method_default(method: Recipe, option: str, value: Any) -> bool:
    """Whether ``method`` already runs with ``option = value`` (a sweep point that equals
    the method's own configuration is the same run as the method's table cell)."""
    if method.robustkd is None:
        return False
    return getattr(robustkd_config(dict(method.robustkd)), option) == value


def _pairs_for(study: Study, scale: Scale, paper_dataset: str) -> list[tuple[str, str]]:
    """``(paper pair, pair at this scale)``, deduplicated, at most ``scale.keep_pairs``."""
    paper_pairs = study.pairs.get(paper_dataset)
    if paper_pairs is None:  # a dataset the study has no row for: use its first row's pairs
        paper_pairs = next(iter(study.pairs.values()))
    out: list[tuple[str, str]] = []
    for pp in paper_pairs:
        mapped = scale.pair(pp, sweep=study.kind == "sweep")
        if mapped not in [m for _, m in out]:
            out.append((pp, mapped))
    return out if scale.keep_pairs is None else out[: scale.keep_pairs]


def plan_study(study: Study, scale: Scale, datasets: list[str], seeds: list[int],
               attacks: list[str] | None = None, methods: list[str] | None = None,
               planner: Planner | None = None) -> list[Cell]:
    """Every cell of ``study`` for these datasets and seeds (nodes shared via ``planner``)."""
    planner = planner or Planner(scale)
    use_attacks = [a for a in study.attacks if attacks is None or a in attacks]
    if attacks is not None and not use_attacks:
        raise ConfigError(f"{study.name} uses attacks {list(study.attacks)}; none of {attacks}")
    use_methods = [m for m in study.methods if methods is None or m in methods]
    if methods is not None:  # extra methods a user asks for become extra columns
        use_methods += [m for m in methods if m not in use_methods and study.kind == "table"]
    cells: list[Cell] = []
    for dataset in datasets:
        paper_ds = STAND_INS.get(dataset, dataset)
        for paper_pair, pair in _pairs_for(study, scale, paper_ds):
            t_model, s_model = pair.split("-", 1)
            for seed in seeds:
                where = {"study": study.name, "dataset": dataset, "paper_dataset": paper_ds,
                         "paper_pair": paper_pair, "pair": pair, "seed": seed}
                clean = planner.clean_teacher(dataset, t_model, seed)
                cells.append(Cell(**where, column="teacher/clean", node=clean))
                if study.kind == "scan":
                    scan = planner.scan(clean, None, seed)
                    cells.append(Cell(**where, column="scan/clean", node=scan))
                for attack in use_attacks:
                    bad = planner.attacked_teacher(clean, attack, seed)
                    cells.append(Cell(**where, column=f"teacher/{attack}", node=bad))
                    if study.kind == "scan":
                        scan = planner.scan(bad, clean, seed)
                        cells.append(Cell(**where, column=f"scan/{attack}", node=scan))
                    elif study.kind == "sweep":
                        fkd = planner.student(bad, s_model, get_recipe("fkd"), seed)
                        cells.append(Cell(**where, column=f"{attack}/fkd", node=fkd))
                        method = get_recipe(use_methods[0])
                        for value in study.sweep_values:
                            if _is_method_default(method, study.sweep_option, value):
                                # the method's own setting: the tables' run, computed once
                                node = planner.student(bad, s_model, method, seed)
                            else:
                                node = planner.student(
                                    bad, s_model, method, seed, {study.sweep_option: value},
                                    tag=f"-{study.sweep_option}{value}")
                            cells.append(Cell(**where, column=f"{attack}/{value}", node=node))
                    else:
                        for name in use_methods:
                            node = planner.student(bad, s_model, get_recipe(name), seed)
                            cells.append(Cell(**where, column=f"{name}/{attack}", node=node))
    return cells
