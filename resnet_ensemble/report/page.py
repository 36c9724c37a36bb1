"""The report being built: the figures written so far and the sections of report.md, with
the one number format every section shares (errors as percentages, so rows compare at a
glance)."""

from __future__ import annotations

import io
import math

import matplotlib.pyplot as plt

from resnet_ensemble import workdir as workdir_lib

DPI = 120


def pct(x: float, digits: int = 2) -> str:
  """An error rate (a fraction) as a percentage, "6.10 %"; "n/a" for a missing one."""
  if x is None or not math.isfinite(float(x)):
    return "n/a"
  return f"{100 * float(x):.{digits}f} %"


def pp(x: float) -> str:
  """A difference of two error rates, in percentage points."""
  return f"{100 * float(x):.2f} percentage points"


class Page:
  """Collects the files written and the report's sections in the order they are drawn."""

  def __init__(self, out_dir: str):
    self.out_dir = out_dir
    self.files: list[str] = []
    self.sections: list[tuple[str, str | None, list[str]]] = []

  def save(self, fig: plt.Figure, name: str) -> str:
    """Writes the figure as a PNG in out_dir and closes it; returns the name to link."""
    path = workdir_lib.path(self.out_dir, name)
    buffer = io.BytesIO()  # via bytes: savefig cannot write to gs:// itself
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    workdir_lib.check_owner(self.out_dir)  # a workdir another job took over is not written
    path.write_bytes(buffer.getvalue())
    self.files.append(str(path))
    return name

  def section(self, title: str, image: str | None, text: list[str]) -> None:
    """A section of report.md: a title, its figure (if any) and paragraphs of findings."""
    self.sections.append((title, image, text))
