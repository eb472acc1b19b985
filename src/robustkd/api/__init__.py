"""The Python API behind every CLI command: one keyword function per job.

Each function reads data, builds or loads models, runs the one training loop, writes a
run directory (checkpoint per epoch, ``meta.json``, ``record.json``) and returns the
record as a dict. Its keywords and defaults are its job's fields (:mod:`robustkd.jobs`);
``run_<command>(job)`` takes a job already built. One module per command, plus the run
context (:mod:`~robustkd.api.context`) and the data and model loading they share.
"""

from robustkd.api.attack import attack, run_attack
from robustkd.api.context import RunContext, read_record
from robustkd.api.defend import defend, run_defend
from robustkd.api.distill import distill, run_distill
from robustkd.api.evaluate import evaluate, run_evaluate
from robustkd.api.imports import import_weights, run_import
from robustkd.api.models import load_factory
from robustkd.api.scan import run_scan, scan
from robustkd.api.train import run_train, train
from robustkd.data import per_class_subset
from robustkd.defenses.robustkd_transform import load_detox

__all__ = ["RunContext", "attack", "defend", "distill", "evaluate", "import_weights",
           "load_detox", "load_factory", "per_class_subset", "read_record", "run_attack",
           "run_defend", "run_distill", "run_evaluate", "run_import", "run_scan", "run_train",
           "scan", "train"]
