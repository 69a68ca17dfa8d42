"""The explorers' base: a live ipywidgets tree where a front end renders widgets, a static HTML snapshot elsewhere.

JupyterLab's widget manager shows the live widget; anything without one (a papermill output notebook, nbconvert, a
notebook viewer) shows the snapshot, so nothing fails and the executed notebook still shows results.
"""
from __future__ import annotations

from typing import Any

import ipywidgets as widgets

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


class Explorer:
    """Base of the explorers: the live widget where a front end renders widgets, a static HTML snapshot elsewhere."""

    widget: widgets.Widget

    def static_html(self) -> str:
        """HTML of the explorer's current state, for front ends without a widget manager."""
        raise NotImplementedError

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """Both renderings in one bundle; the front end picks the richest it can show."""
        live = getattr(self.widget, "_repr_mimebundle_", None)  # None once the widget is closed
        bundle = dict(live(**kwargs) or {}) if callable(live) else {}
        bundle["text/html"] = self.static_html()
        bundle.setdefault("text/plain", f"<{type(self).__name__}>")
        return bundle
