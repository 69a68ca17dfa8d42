"""Interactive explorers for JupyterLab and teaching: compare base and CP generations, play with the CP loss, browse
a pairs file.

Each explorer keeps its ipywidgets tree in `.widget` and displays through a mime bundle that carries both the live
widget view and a static HTML snapshot of its current state: JupyterLab's widget manager shows the live widget,
anything without one (a papermill output notebook, nbconvert, a notebook viewer) shows the snapshot, so nothing
fails and the executed notebook still shows results.
"""
from cpwb.app.widgets.base import WIDGET_VIEW, Explorer
from cpwb.app.widgets.browser import PairsBrowser, filter_pairs, pairs_page_html, pairs_table, score_records
from cpwb.app.widgets.compare import CompareExplorer, continue_and_score
from cpwb.app.widgets.playground import LossPlayground, LossState, first_negative_push, loss_state

__all__ = ["WIDGET_VIEW", "CompareExplorer", "Explorer", "LossPlayground", "LossState", "PairsBrowser",
           "continue_and_score", "filter_pairs", "first_negative_push", "loss_state", "pairs_page_html", "pairs_table",
           "score_records"]
