"""FKD: "A Comprehensive Overhaul of Feature Distillation" (Heo et al. 2019).

Pre-ReLU teacher features at the end of each stage, a margin ReLU on the teacher side
(per-channel margin from the following BN, or measured on clean data), a 1x1 conv + BN
connector on the student side, the partial L2 distance, stage weights 1/2^(L-l), and
``CE + beta * L_FD / (batch * 1000)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustkd.distill.base import Distiller, register_method
from robustkd.distill.kd import KDSettings
from robustkd.distill.losses import (
    bn_margin,
    empirical_margin,
    fkd_feature_loss,
    kd_loss,
    soft_target_loss,
)
from robustkd.errors import ConfigError
from robustkd.models.taps import resolve_modules, tap
from robustkd.settings import setting


class Connector(nn.Sequential):
    """FKD's connector, a 1x1 conv (no bias) then BN, whose training-mode forward folds the
    BN into the conv.

    A 1x1 conv is linear per pixel, so the batch statistics of its output follow from its
    input's: mean ``W mu`` and variance ``diag(W Sigma W^T)``. Normalising with them is one
    conv with scaled weights and a bias: the same function of the input as conv then BN (so
    the same gradients), without BN's own passes over the widest map of the step. The
    running statistics are updated as BN would; in eval mode it is plain conv then BN.
    """

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        conv = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / teacher_channels))
        super().__init__(conv, nn.BatchNorm2d(teacher_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self[0], self[1]
        if not (self.training and bn.training):
            return super().forward(x)
        wide = torch.promote_types(conv.weight.dtype, torch.float32)  # bf16 inputs: float32
        w = conv.weight.flatten(1).to(wide)
        with torch.autocast(x.device.type, enabled=False):
            rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).to(wide)  # channels_last: a view
            n = rows.shape[0]
            mu = rows.mean(0)
            cov = rows.T @ rows / n - torch.outer(mu, mu)
            mean = w @ mu
            var = ((w @ cov) * w).sum(1).clamp_min(0)
            scale = bn.weight * torch.rsqrt(var + bn.eps)
            weight = (w * scale[:, None]).view_as(conv.weight)
            bias = bn.bias - mean * scale
        self._track(bn, mean.detach(), var.detach(), n)
        return F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype))

    @staticmethod
    @torch.no_grad()
    def _track(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """BN's running statistics update (unbiased variance, BN's momentum)."""
        if not bn.track_running_stats:
            return
        bn.num_batches_tracked.add_(1)
        m = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), m)
        bn.running_var.lerp_((var * n / max(n - 1, 1)).to(bn.running_var.dtype), m)


def connector(student_channels: int, teacher_channels: int) -> Connector:
    """1x1 conv (no bias) + BN mapping student channels to the teacher's."""
    return Connector(student_channels, teacher_channels)


def salt_and_pepper(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Set ``fraction`` of the pixels (all channels together) to the batch's per-channel
    minimum or maximum, half each: salt-and-pepper noise on already normalised images."""
    if fraction <= 0:
        return x
    b, c, h, w = x.shape
    u = torch.rand(b, 1, h, w, device=x.device)
    lo = x.amin(dim=(0, 2, 3), keepdim=True)
    hi = x.amax(dim=(0, 2, 3), keepdim=True)
    out = torch.where(u < fraction / 2, lo, x)
    return torch.where((u >= fraction / 2) & (u < fraction), hi, out)


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float):
    """Mixup (Zhang et al. 2018) of one batch: ``lam * x + (1 - lam) * x[perm]`` with one
    ``lam ~ Beta(alpha, alpha)`` per batch; returns the mixed batch, the partners' labels and
    ``lam``. A teacher asked about blends of the defender's few images labels points it was
    never tuned on, where a copy tuned on those images only repeats their labels."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], device=x.device)
    return x.lerp(x[perm], 1.0 - lam), y[perm], lam


def mixed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, y_partner: torch.Tensor | None,
                        lam: float) -> torch.Tensor:
    """Cross-entropy on mixup's blended labels (plain CE when nothing was mixed)."""
    if y_partner is None:
        return F.cross_entropy(logits, y)
    return lam * F.cross_entropy(logits, y) + (1.0 - lam) * F.cross_entropy(logits, y_partner)


@dataclass(frozen=True)
class FKDSettings:
    beta: float = setting(1.0, "feature-loss weight", minimum=0.0)
    scale: float = setting(1000.0, "the feature loss is divided by batch * scale (FKD's 1000)",
                           above=0.0)
    teacher_bn: str = setting("train", "teacher BN on batch statistics (train, FKD's choice) "
                                       "or running statistics (eval)", choices=("train", "eval"))
    spatial: str = setting("error", "when teacher and student maps differ in size: refuse, "
                                    "or pool the larger to the smaller",
                           choices=("error", "pool"))
    input_noise: float = setting(0.0, "salt-and-pepper noise on this fraction of the "
                                      "student's input pixels (the RobustKD authors' "
                                      "undocumented trick)", minimum=0.0, maximum=1.0)
    feature_share: float = setting(1.0, "share of the run's steps with the feature loss; "
                                        "the rest learns from the teacher's logits and the "
                                        "labels (KD with its default temperature and alpha; "
                                        "not in FKD)", above=0.0, maximum=1.0)
    logit_weight: float = setting(0.0, "weight of KD's soft-target term (T^2 KL at KD's "
                                       "temperature) on the logit teacher's outputs, added "
                                       "to the loss (not in FKD)", minimum=0.0)
    skip_deepest: bool = setting(False, "leave the deepest distillation layer out of the "
                                        "feature loss (not in FKD; the backdoors that cross "
                                        "FKD cross there, docs/RESULTS.md)")
    mixup: float = setting(0.0, "mixup on the feature loss's batches: teacher and student "
                                "see each image blended with another of the batch by a "
                                "weight drawn from Beta(a, a), the labels blended alike (not "
                                "in FKD; 0 = off)", minimum=0.0)


@register_method
class FeatureDistillation(Distiller):
    name = "fkd"
    settings = FKDSettings

    def __init__(self, setup) -> None:
        super().__init__(setup)
        if len(setup.teacher_layers) != len(setup.student_layers):
            raise ConfigError(
                f"FKD pairs layers one to one: teacher has {len(setup.teacher_layers)} "
                f"distillation layers ({', '.join(d.prerelu for d in setup.teacher_layers)}), "
                f"student {len(setup.student_layers)} "
                f"({', '.join(d.prerelu for d in setup.student_layers)}); name equally many "
                "layers of equal resolution (API teacher_layers=/student_layers=, CLI "
                "--teacher-layers/--student-layers), e.g. the deeper model's last ones")
        self.t_layers, s_layers = list(setup.teacher_layers), list(setup.student_layers)
        if self.options["skip_deepest"]:
            if len(self.t_layers) < 2:
                raise ConfigError("FKD's skip_deepest needs at least two distillation layers; "
                                  f"got {len(self.t_layers)}")
            self.t_layers, s_layers = self.t_layers[:-1], s_layers[:-1]
        self.t_names = [layer.prerelu for layer in self.t_layers]
        self.s_names = [layer.prerelu for layer in s_layers]
        self.connectors = nn.ModuleList()
        self.register_buffer("_margins_ready", torch.zeros((), dtype=torch.bool))
        # steps taken (kept in the resume state), for feature_share < 1
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._step: int | None = None  # its host-side copy

    def teacher_mode(self) -> str:
        return self.options["teacher_bn"]

    @torch.no_grad()
    def prepare(self, probe: torch.Tensor) -> None:
        """Build connectors from the features' shapes and compute the teacher's margins."""
        _, t_feats = self.teacher_forward(probe, self.t_names)
        was_training = self.student.training
        self.student.eval()
        with tap(self.student, self.s_names, detach=True) as s_feats:
            self.student(probe)
        self.student.train(was_training)
        for t_name, s_name in zip(self.t_names, self.s_names, strict=True):
            t, s = t_feats[t_name], s_feats[s_name]
            if t.dim() != 4 or s.dim() != 4:
                raise ConfigError(f"FKD needs [B, C, H, W] features; teacher {t_name} gives "
                                  f"{tuple(t.shape)}, student {s_name} gives {tuple(s.shape)}")
            if t.shape[2:] != s.shape[2:] and self.options["spatial"] == "error":
                raise ConfigError(
                    f"teacher layer {t_name} is {t.shape[2]}x{t.shape[3]} but student layer "
                    f"{s_name} is {s.shape[2]}x{s.shape[3]}; pick layers of equal spatial size "
                    "or pass the FKD option spatial=pool to average-pool the larger map")
            self.connectors.append(connector(s.shape[1], t.shape[1]).to(probe.device))
        # each copy of a cross-fitted teacher has its own BNs, hence its own margins
        for k in range(len(self.teachers)):
            self.use_teacher(k)
            feats = t_feats if k == 0 else self.teacher_forward(probe, self.t_names)[1]
            for i, margin in enumerate(self._teacher_margins(feats)):
                self.register_buffer(self._margin_name(i, k), margin.to(probe.device))
        self.use_teacher(0)

    def _teacher_margins(self, t_feats) -> list[torch.Tensor]:
        """The active teacher's margin per layer: from the BN after it, else measured."""
        bns = resolve_modules(self.teacher, [layer.bn for layer in self.t_layers if layer.bn])
        margins = []
        for t_layer, t_name in zip(self.t_layers, self.t_names, strict=True):
            t = t_feats[t_name]
            if t_layer.bn:
                bn = bns[t_layer.bn]
                margin = bn_margin(bn.weight, bn.bias)
            else:
                margin = empirical_margin(t)
            if margin.numel() != t.shape[1]:
                raise ConfigError(f"margin BN {t_layer.bn} has {margin.numel()} channels but "
                                  f"feature {t_name} has {t.shape[1]}")
            margins.append(margin)
        return margins

    @staticmethod
    def _margin_name(layer: int, teacher: int) -> str:
        return f"margin{layer}" if teacher == 0 else f"margin{layer}_t{teacher}"

    def margins(self) -> list[torch.Tensor]:
        return [getattr(self, self._margin_name(i, self.active_teacher))
                for i in range(len(self.t_names))]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._step = None  # a resumed count: read it again at the next step

    def in_feature_phase(self) -> bool:
        """Whether this step still matches features (always, unless ``feature_share`` < 1);
        counts the step."""
        if self.options["feature_share"] >= 1.0:
            return True
        if self.total_steps is None:
            raise ConfigError("FKD's feature_share needs the run's length: distil with "
                              "distill_student")
        if self._step is None:  # read once (a resumed run's count), not each step
            self._step = int(self.steps_done)
        step, self._step = self._step, self._step + 1
        self.steps_done.fill_(self._step)  # no host sync: the state a resume reads
        return step < round(self.options["feature_share"] * self.total_steps)

    def loss(self, x: torch.Tensor, y: torch.Tensor):
        if not self.in_feature_phase():
            return self.logit_loss(x, y)
        y_partner, lam = None, 1.0
        if self.options["mixup"] > 0:
            x, y_partner, lam = mixup(x, y, self.options["mixup"])
        t_logits, t_feats = self.teacher_forward(x, self.t_names)
        x_student = x if self.setup.student_input is None else self.setup.student_input(x)
        x_student = salt_and_pepper(x_student, self.options["input_noise"])
        n, extra = x.shape[0], x_student.shape[0] - x.shape[0]
        if not 0 <= extra <= n:
            raise ConfigError(f"a student-input transform may append at most one row per "
                              f"batch row; got {x_student.shape[0]} rows for {n}")
        with self.taps(self.student, self.s_names).recording() as s_taps:
            all_logits = self.student(x_student)
        logits = all_logits[:n]
        s_feats, t_list = [], []
        for conn, t_name, s_name in zip(self.connectors, self.t_names, self.s_names, strict=True):
            s, t = conn(s_taps[s_name][:n]), t_feats[t_name]
            if s.shape[2:] != t.shape[2:]:
                size = tuple(min(a, b) for a, b in zip(s.shape[2:], t.shape[2:], strict=True))
                s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
            s_feats.append(s)
            t_list.append(t)
        feat = fkd_feature_loss(s_feats, t_list, self.margins())
        feat = feat / (x.shape[0] * self.options["scale"])
        ce = mixed_cross_entropy(logits, y, y_partner, lam)
        if extra:  # appended rows copy the first ones: their labels, no teacher features
            ce = ce + mixed_cross_entropy(all_logits[n:], y[:extra],
                                          None if y_partner is None else y_partner[:extra], lam)
        loss = ce + self.options["beta"] * feat
        if self.options["logit_weight"] > 0:
            soft = soft_target_loss(logits, self.logit_teacher_forward(x, t_logits),
                                    KDSettings().temperature)
            loss = loss + self.options["logit_weight"] * soft
        return loss, {"train_acc": (logits.argmax(1) == y).sum(),
                      "feat_loss": feat.detach() * x.shape[0]}

    def logit_loss(self, x: torch.Tensor, y: torch.Tensor):
        """After the feature phase: KD from the (logit) teacher's logits (KD's defaults)."""
        t_logits = self.logit_teacher_forward(x)
        x_student = salt_and_pepper(x, self.options["input_noise"])
        logits = self.student(x_student)
        kd = KDSettings()
        loss = kd_loss(logits, t_logits, y, kd.temperature, kd.alpha)
        return loss, {"train_acc": (logits.argmax(1) == y).sum(),
                      "feat_loss": torch.zeros((), device=x.device)}
