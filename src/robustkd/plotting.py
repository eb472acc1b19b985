"""Figures are optional: matplotlib is an extra (``pip install robustkd[plot]``).

Every PNG the project draws goes through these two helpers, so each plot says once that it
may be skipped and every figure is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robustkd.io import atomic_write


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the file-only Agg backend, or ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_png(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` atomically and free it."""
    import matplotlib.pyplot as plt

    out = atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    plt.close(fig)
    return out
