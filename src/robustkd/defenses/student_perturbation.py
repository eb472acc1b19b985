"""An online universal perturbation on the student during distillation (not in the paper).

The trigger synthesis of :mod:`robustkd.defenses.inversion` searches the *teacher* for a
trigger of one family (a small-budget blend) before distilling; a trigger outside that
family is missed. Here the search runs on the *student*, during distillation, in a family
that covers additive triggers of any shape: one universal perturbation ``delta`` (pixel
units, ``|delta| <= eps`` everywhere). On a share of each batch the student sees
``x + delta`` while the teacher sees ``x``, so the distillation loss asks the student to
answer the perturbed image as the teacher answers the clean one; ``delta`` then ascends
that same loss by one signed step, using the gradient the training step's own backward
pass left on it (no extra forward or backward). This is universal adversarial training
(Shafahi et al., AAAI 2020) folded into the distillation: a backdoor the student picked up
is a universal direction that changes its answers, which the ascent moves towards and the
descent unlearns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from robustkd.data.loader import denormalize, normalize
from robustkd.errors import ConfigError

# replace: perturbed images take the place of a share of the batch and the full loss (the
# teacher's clean features); append: perturbed copies of a share join the batch and learn
# their labels only, so the distillation signal on the clean images is untouched
MODES = ("replace", "append")


@dataclass(frozen=True)
class PerturbationSettings:
    """What the perturbation does (RobustKDConfig's ``student_perturbation``,
    ``perturbation_*`` settings build it; its defaults live there)."""

    share: float
    eps: float
    step: float
    mode: str = "replace"
    start_batch: int = 0  # batches passed through untouched before it starts

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"student perturbation mode must be one of {MODES}, "
                              f"got {self.mode!r}")
        if not 0 < self.share <= 1:
            raise ConfigError(f"student perturbation share must be in (0, 1], got {self.share}")
        if not 0 < self.eps <= 1 or not 0 < self.step <= self.eps:
            raise ConfigError(f"student perturbation needs 0 < step <= eps <= 1, got step "
                              f"{self.step}, eps {self.eps}")
        if self.start_batch < 0:
            raise ConfigError(f"student perturbation start must be >= 0, got {self.start_batch}")


class OnlinePerturbation:
    """A student-input transform holding the universal perturbation; call it on each
    normalised batch (the distiller does) and it first applies the ascent step the last
    batch's backward pass made possible. The perturbation is not in a run's resume state:
    a resumed distillation starts it afresh (and counts ``start_batch`` again)."""

    def __init__(self, settings: PerturbationSettings, mean: Sequence[float],
                 std: Sequence[float], seed: int = 0) -> None:
        self.settings = settings
        self.mean, self.std, self.seed = mean, std, seed
        self.delta: torch.Tensor | None = None
        self._gen: torch.Generator | None = None
        self.steps = 0
        self.batches = 0

    def _start(self, x: torch.Tensor) -> None:
        self._gen = torch.Generator(device=x.device).manual_seed(self.seed)
        delta = (torch.rand(x.shape[1:], device=x.device, generator=self._gen) * 2 - 1)
        self.delta = (delta * self.settings.eps).requires_grad_(True)

    def ascend(self) -> None:
        """One signed ascent step from the gradient left on ``delta``, then back into the
        box ``[-eps, eps]``."""
        if self.delta is None or self.delta.grad is None:
            return
        with torch.no_grad():
            eps = self.settings.eps
            self.delta.add_(self.settings.step * self.delta.grad.sign()).clamp_(-eps, eps)
        self.delta.grad = None
        self.steps += 1

    def summary(self) -> dict[str, float | int]:
        """For the record: ascent steps taken and the perturbation's size at the end."""
        d = self.delta.detach() if self.delta is not None else torch.zeros(1)
        return {"steps": self.steps, "abs_mean": round(float(d.abs().mean()), 4),
                "at_bound": round(float((d.abs() >= self.settings.eps - 1e-6).float().mean()), 4)}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.batches += 1
        if self.batches <= self.settings.start_batch:
            return x
        if self.delta is None or self.delta.device != x.device:
            self._start(x)
        self.ascend()
        share = self.settings.share
        if self.settings.mode == "append":  # the batch is shuffled: its first rows are random
            copies = x[:max(1, round(share * x.shape[0]))]
            return torch.cat([x, self._perturb(copies)])
        chosen = torch.rand(x.shape[0], device=x.device, generator=self._gen) < share
        return torch.where(chosen.view(-1, 1, 1, 1), self._perturb(x), x)

    def _perturb(self, x: torch.Tensor) -> torch.Tensor:
        pixels = denormalize(x.float(), self.mean, self.std)
        return normalize((pixels + self.delta).clamp(0, 1), self.mean, self.std).to(x.dtype)


def compose(*transforms):
    """The student-input transforms applied in order (``None`` entries skipped); ``None``
    when there are none."""
    used = [t for t in transforms if t is not None]
    if not used:
        return None
    if len(used) == 1:
        return used[0]

    def apply(x: torch.Tensor) -> torch.Tensor:
        for t in used:
            x = t(x)
        return x

    return apply
