"""The quick evaluation of a sweep point: the downstream accuracy change, measured during the point or added later
from its saved artefact, the same either way; the base's cached figures reused. Tiny random model (plumbing)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cpwb.core.errors import InputError
from cpwb.steps.experiment import QuickEvalConfig, add_downstream, downstream_change, train_and_evaluate
from tests.test_train import tiny_config, tiny_setup  # noqa: F401 (tiny_setup is a fixture)

SIZES = dict(heldout_pairs=4, rtp_prompts=3, max_new_tokens=3, wikitext_windows=1, batch_size=4)


def test_downstream_change_is_the_paired_accuracy_difference_and_absent_when_a_side_was_not_measured():
    base, trained = {"downstream_correct": [1, 0, 1, 0, 1, 1]}, {"downstream_correct": [1, 1, 1, 0, 1, 1]}
    change = downstream_change(base, trained)
    assert change["downstream_change"] == pytest.approx(1 / 6)
    assert change["downstream_change_low"] <= change["downstream_change"] <= change["downstream_change_high"]
    assert downstream_change(base, {}) == {}


def test_a_points_downstream_change_is_the_same_measured_while_it_runs_or_added_later_from_its_artefact(
        tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)  # the base figures' cache: outputs/base-eval under the working directory
    measured = train_and_evaluate(tiny_config(tiny_setup, tmp_path / "a", steps=2),
                                  QuickEvalConfig(**SIZES, downstream_items=5))
    assert len(measured["trained"]["downstream_correct"]) == 10  # 5 HellaSwag, then 5 PIQA
    assert measured["downstream_change"] == pytest.approx(
        np.mean(measured["trained"]["downstream_correct"]) - np.mean(measured["base"]["downstream_correct"]))
    assert measured["downstream_items"] == 5
    cache = list((tmp_path / "outputs" / "base-eval").glob("*.json"))
    assert len(cache) == 1

    later = train_and_evaluate(tiny_config(tiny_setup, tmp_path / "b", steps=2), QuickEvalConfig(**SIZES))
    assert "downstream_change" not in later and "downstream_correct" not in later["trained"]
    assert list((tmp_path / "outputs" / "base-eval").glob("*.json")) == cache  # one base cache for both
    added = add_downstream(tmp_path / "b", 5)
    assert added["downstream_change"] == pytest.approx(measured["downstream_change"])  # same seed, same adapter
    assert added["downstream_change_low"] == pytest.approx(measured["downstream_change_low"])
    point = json.loads((tmp_path / "b" / "result.json").read_text())
    assert point["trained"]["downstream_correct"] == measured["trained"]["downstream_correct"]
    assert point["eval"] == later["eval"]  # the point's settings stay those it ran with
    assert add_downstream(tmp_path / "b", 5) == {}  # measured already

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "result.json").write_text(json.dumps(later))
    with pytest.raises(InputError, match="adapter: no saved artefact"):
        add_downstream(tmp_path / "c", 5)
