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



class OtherWorker:
    """Another worker holding the base cache's lock, in its own thread (as another process would), until told to
    let go; `finish` may first write what it computed."""

    def __init__(self, lock_path):
        import threading

        from filelock import FileLock

        self.lock, self.taken, self.go = FileLock(lock_path), threading.Event(), threading.Event()
        self.finish = lambda: None
        self.thread = threading.Thread(target=self._hold)
        self.thread.start()
        assert self.taken.wait(30)

    def _hold(self):
        with self.lock:
            self.taken.set()
            self.go.wait(60)
            self.finish()

    def release(self, finish=lambda: None):
        self.finish = finish
        self.go.set()
        self.thread.join(60)


def test_a_worker_that_finds_the_base_being_computed_trains_first_and_the_base_is_computed_once(
        tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    """Two workers of a sweep start together: the one holding the base cache's lock computes the base figures, the
    other trains and evaluates its own point meanwhile and then reads the cache, computing nothing twice."""
    import cpwb.steps.experiment as experiment

    monkeypatch.chdir(tmp_path)
    config, sizes = tiny_config(tiny_setup, tmp_path / "a", steps=2), QuickEvalConfig(**SIZES)
    path = tmp_path / "outputs" / "base-eval" / f"{experiment._eval_key(config, sizes)}.json"
    path.parent.mkdir(parents=True)
    other = OtherWorker(f"{path}.lock")  # inside its base computation
    computed, trained_while_locked = [], []
    compute, train = experiment._compute_base, experiment.train

    def counted(*args, **kwargs):
        computed.append(args[0])
        return compute(*args, **kwargs)

    def train_then_other_finishes(*args, **kwargs):
        trained_while_locked.append(not other.go.is_set() and not path.exists())  # still held
        other.release(lambda: counted(path, config, sizes, False))  # it writes the cache and lets go
        return train(*args, **kwargs)

    monkeypatch.setattr(experiment, "_compute_base", counted)
    monkeypatch.setattr(experiment, "train", train_then_other_finishes)
    assert experiment.base_eval(config, sizes, wait=False) is None  # taken: nothing computed, nothing written
    assert computed == [] and not path.exists()

    result = experiment.train_and_evaluate(config, sizes)
    assert trained_while_locked == [True]  # it trained before the base figures existed
    assert computed == [path]  # only the other worker computed them
    assert result["base"] == json.loads(path.read_text())
    assert result["toxicity_change"] == pytest.approx(
        result["trained"]["greedy_toxicity"] / result["base"]["greedy_toxicity"] - 1)


def test_a_worker_waiting_for_the_base_reads_what_the_lock_holder_wrote(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    import threading

    import cpwb.steps.experiment as experiment

    config, sizes = tiny_config(tiny_setup, tmp_path / "a", steps=2), QuickEvalConfig(**SIZES)
    root = tmp_path / "cache"
    first = experiment.base_eval(config, sizes, root)  # computed and cached
    path = root / f"{experiment._eval_key(config, sizes)}.json"
    written = path.read_text()
    path.unlink()
    other = OtherWorker(f"{path}.lock")
    monkeypatch.setattr(experiment, "_compute_base", lambda *a, **k: pytest.fail("computed twice"))
    timer = threading.Timer(0.5, other.release, kwargs={"finish": lambda: path.write_text(written)})
    timer.start()  # the lock holder writes its figures a moment later
    again = experiment.base_eval(config, sizes, root)  # waited, then read the cache
    assert json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)  # (NaN phi: no held-out pairs)
    timer.join()
