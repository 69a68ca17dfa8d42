"""Saving plotly figures as HTML that open offline, with one copy of plotly.js per folder.

Inlining plotly.js costs 4.8 MB per figure; instead each folder of figures holds one `plotly.min.js` (written once,
atomically, from the installed plotly) and every page references it by a relative path, so a run folder opens
offline, as a whole, wherever it is copied.
"""
from __future__ import annotations

from pathlib import Path

from cpwb.core.files import atomic_write_text

PLOTLY_JS = "plotly.min.js"


def plotly_js(folder: str | Path) -> Path:
    """`folder/plotly.min.js`, written from the installed plotly unless a copy of the same size is there."""
    from plotly.offline import get_plotlyjs

    path = Path(folder) / PLOTLY_JS
    text = get_plotlyjs()
    if not path.is_file() or path.stat().st_size != len(text.encode("utf-8")):
        atomic_write_text(path, text)
    return path


def figure_html(fig, script_src: str | bool, full_html: bool = True) -> str:
    """A figure's HTML loading plotly.js from `script_src` (a path relative to the page; False: the page loads it)."""
    return fig.to_html(include_plotlyjs=script_src, full_html=full_html)


def save_figure(fig, run_dir: str | Path | None, name: str) -> Path | None:
    """Write `fig` to `run_dir/figures/<name>.html` atomically, beside the folder's one plotly.js (None without a
    run folder)."""
    if not run_dir:
        return None
    folder = Path(run_dir) / "figures"
    plotly_js(folder)
    return atomic_write_text(folder / f"{name}.html", figure_html(fig, PLOTLY_JS))
