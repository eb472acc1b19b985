"""Distillation losses as pure functions of tensors (easy to check by hand)."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """Hinton KD: ``alpha * T^2 * KL(p_T || p_S) + (1 - alpha) * CE(z_S, y)`` (batch mean)."""
    ce = F.cross_entropy(student_logits.float(), labels)
    return alpha * soft_target_loss(student_logits, teacher_logits, temperature) + (1 - alpha) * ce


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     temperature: float = 4.0) -> torch.Tensor:
    """KD's soft-target term ``T^2 * KL(p_T || p_S)`` at temperature ``T`` (batch mean)."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return temperature**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()


def flat_view(x: torch.Tensor) -> torch.Tensor:
    """The elements of a dense tensor as one vector, in memory order: a view, where
    ``reshape(-1)`` would copy a channels-last map into NCHW order first."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)
    return x.reshape(-1)


# a map this large is worth one compiled pass: smaller ones (tests, toy models) stay eager,
# so they never wait for a compiler
FUSE_MIN_ELEMENTS = 1 << 20
_fusion = {"usable": True}


def _kept_difference(student: torch.Tensor, teacher: torch.Tensor,
                     margin: torch.Tensor | None) -> torch.Tensor:
    """``student - max(teacher, margin)`` in at least float32 (bf16 features under autocast:
    the sign of the difference is exact), zero where ReLU erases it (student below a
    non-positive teacher value); one pointwise expression, so a compiler makes it one pass."""
    wide = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    t = teacher.to(wide)
    if margin is not None:  # the margin unrounded (a compiler drops a bf16 round trip)
        t = torch.maximum(t, margin.to(wide).view(1, -1, *([1] * (teacher.dim() - 2))))
    diff = student.to(wide) - t
    return torch.where((diff <= 0) & (t <= 0), 0.0, diff)


def _sum_and_difference(student, teacher, margin) -> tuple[torch.Tensor, torch.Tensor]:
    diff = _kept_difference(student, teacher, margin)
    return (diff * diff).sum(), diff


@functools.cache
def _fused_terms():
    """The loss and kept difference compiled into one pass, built at first use (importing
    the compiler is not free)."""
    return torch.compile(_sum_and_difference, dynamic=False, fullgraph=True)


class _PartialL2(torch.autograd.Function):
    """``partial_l2`` with its gradient written out: one float32 difference is kept and reused
    by the backward pass, instead of autograd's chain of casts, masks and powers (FKD's
    largest feature maps make this the step's costliest elementwise work). With a margin the
    teacher is a constant; ``fused`` computes the forward in one compiled pass."""

    @staticmethod
    def forward(ctx, student, teacher, margin, fused: bool):
        if fused:
            value, diff = _fused_terms()(student, teacher, margin)
        else:
            diff = _kept_difference(student, teacher, margin)
            flat = flat_view(diff)
            value = torch.dot(flat, flat)  # one read, where diff * diff then sum is two
        ctx.save_for_backward(diff)
        ctx.dtypes = (student.dtype, teacher.dtype)
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (diff,) = ctx.saved_tensors
        grad_diff = diff * (2 * grad)
        s_dtype, t_dtype = ctx.dtypes
        grad_s = grad_diff.to(s_dtype) if ctx.needs_input_grad[0] else None
        grad_t = (-grad_diff).to(t_dtype) if ctx.needs_input_grad[1] else None
        return grad_s, grad_t, None, None


def partial_l2(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FKD's distance: squared error summed over elements, skipping those where the student is
    already below a non-positive teacher value (ReLU would erase the difference anyway)."""
    return _PartialL2.apply(student, teacher, None, False)


def margin_partial_l2(student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor,
                      fuse: bool | None = None) -> torch.Tensor:
    """``partial_l2(student, margin_relu(teacher, margin))``, no gradient to the teacher.

    Eagerly this is seven passes over FKD's largest maps; compiled it is one. ``fuse=None``
    fuses maps of at least ``FUSE_MIN_ELEMENTS`` elements. Where compiling fails (no C++
    compiler, say) the same loss is computed unfused from then on, after one warning.
    """
    teacher = teacher.detach()  # the margin's gradient to the teacher is never needed
    if fuse is None:
        fuse = (_fusion["usable"] and teacher.numel() >= FUSE_MIN_ELEMENTS
                and not torch.compiler.is_compiling())  # a compiled loop fuses it itself
    if fuse:
        try:
            return _PartialL2.apply(student, teacher, margin, True)
        except Exception as err:  # noqa: BLE001 - any compiler failure: the unfused loss
            _fusion["usable"] = False
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            warnings.warn(f"FKD's fused feature loss could not be compiled "
                          f"({type(err).__name__}: {first[:200]}); computing it unfused",
                          RuntimeWarning, stacklevel=2)
    return _PartialL2.apply(student, teacher, margin, False)


def margin_relu(feature: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """FKD's teacher transform ``max(F, m_c)`` with a per-channel margin ``m`` of shape ``[C]``."""
    shape = (1, -1, *([1] * (feature.dim() - 2)))
    return torch.maximum(feature, margin.to(feature.dtype).view(shape))


def bn_margin(gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``E[x | x < 0]`` per channel for ``x ~ N(beta, |gamma|)`` (closed form, FKD eq. 3).

    ``m = beta - s * pdf(beta / s) / cdf(-beta / s)`` with ``s = |gamma|``; when the negative
    tail holds less than 0.1% of the mass the formula is unstable and ``-3 s`` is used.
    """
    s = gamma.detach().abs().double().clamp_min(1e-12)
    b = beta.detach().double()
    z = b / s
    pdf = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    cdf_neg = 0.5 * torch.erfc(z / math.sqrt(2))  # Phi(-z)
    m = torch.where(cdf_neg > 1e-3, b - s * pdf / cdf_neg.clamp_min(1e-12), -3 * s)
    return m.float()


def empirical_margin(features: torch.Tensor) -> torch.Tensor:
    """``E[x | x < 0]`` per channel measured on features ``[N, C, ...]`` (models without a BN).

    Channels with no negative value get margin 0 (margin ReLU is then a plain ReLU).
    """
    x = features.detach().float().transpose(0, 1).reshape(features.shape[1], -1)
    neg = x.clamp(max=0)
    count = (x < 0).sum(1)
    return torch.where(count > 0, neg.sum(1) / count.clamp_min(1), torch.zeros_like(neg[:, 0]))


def stage_weights(num_layers: int) -> list[float]:
    """FKD's stage weights ``1 / 2^(L - l)``: the last stage weighs 1, each earlier one half."""
    return [1.0 / 2 ** (num_layers - 1 - i) for i in range(num_layers)]


def fkd_feature_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor],
                     margins: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_l w_l * partial_l2(S'_l, max(T_l, m_l))`` (not yet divided by batch * 1000)."""
    weights = stage_weights(len(teacher_feats))
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for w, s, t, m in zip(weights, student_feats, teacher_feats, margins, strict=True):
        total = total + w * margin_partial_l2(s, t, m)
    return total


def attention_map(feature: torch.Tensor, p: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """NAD / attention-transfer map ``[B, H*W]``: ``mean_c |F_c|^p``, L2-normalised per example.

    Channel mean or sum (NAD's code) give the same map after the normalisation; ``eps``
    keeps an all-zero map finite. Computed in float32 whatever the autocast dtype.
    """
    a = feature.float().abs().pow(p).mean(dim=1).flatten(1)
    return a / (a.norm(dim=1, keepdim=True) + eps)


def attention_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor,
                   p: float = 2.0) -> torch.Tensor:
    """Squared L2 distance between normalised attention maps, averaged over examples and
    positions (NAD's ``MSE``; the paper's betas of 500-5000 are calibrated for this scale)."""
    diff = attention_map(student_feat, p) - attention_map(teacher_feat.detach(), p)
    return diff.pow(2).mean()
