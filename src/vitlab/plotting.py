"""matplotlib without a display, set up once for every figure vitlab writes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed; the one place vitlab picks the backend
import matplotlib.pyplot as plt  # noqa: E402

from vitlab.io import atomic_write  # noqa: E402


def save_figure(figure, path: str | Path, dpi: int = 100) -> Path:
    """Lay out, write atomically as PNG, and close a matplotlib figure."""
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"))
    plt.close(figure)
    return Path(path)


__all__ = ["plt", "save_figure"]
