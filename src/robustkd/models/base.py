"""What a model tells the rest of the toolkit about its distillation layers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DistillLayer:
    """One distillation point: the end of a network stage.

    ``stage``: module whose output is the stage output (where detox masks mix features).
    ``prerelu``: module whose output is the pre-ReLU feature FKD distils (for pre-activation
    networks this is the BatchNorm that follows the stage, so ``prerelu == bn``).
    ``bn``: the BatchNorm whose affine parameters give FKD's margins, or None if there is none.
    """

    stage: str
    prerelu: str
    bn: str | None
