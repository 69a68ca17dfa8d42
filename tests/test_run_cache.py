"""Finished training runs reused (cpwb.steps.training.run_cache): a run with the settings, pairs and code of a stored
one trains no step and gives the same adapter and metrics; anything else trains. Tiny random model (plumbing)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cpwb.steps.training import run_cache
from cpwb.steps.training.trainer import train
from tests.test_peers import _logits, peer_config
from tests.test_train import tiny_config, tiny_setup  # noqa: F401  (the module fixture)


def _steps(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _same_adapter(a, b) -> bool:
    first, second = (load_file(str(r.adapter_dir / "adapter_model.safetensors")) for r in (a, b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_run_with_stored_settings_and_code_trains_no_step_and_gives_the_same_adapter(tiny_setup, tmp_path,  # noqa: F811
                                                                                     monkeypatch):
    monkeypatch.setenv("CPWB_CACHE", str(tmp_path / "cache"))
    entries = lambda: sorted(p.name for p in (tmp_path / "cache" / "runs").iterdir())  # noqa: E731
    first = train(tiny_config(tiny_setup, tmp_path / "a", run_cache=True))
    assert _steps(tmp_path / "a") == ["step-000002", "step-000004"] and len(entries()) == 1

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "train_evaluate.ipynb").write_text("{}")  # a sweep point's notebook, executing in the folder
    again = train(tiny_config(tiny_setup, tmp_path / "b", run_cache=True))
    assert _steps(tmp_path / "b") == ["step-000004"]  # copied in: no step of its own
    assert (tmp_path / "b" / "train_evaluate.ipynb").read_text() == "{}"
    assert again.metrics == first.metrics  # the original step times: the fitting cost stays the training's
    assert _same_adapter(first, again)
    assert torch.equal(_logits(again.model.eval(), again.tokenizer), _logits(first.model.eval(), first.tokenizer))
    assert len(entries()) == 1

    other = train(tiny_config(tiny_setup, tmp_path / "c", run_cache=True, lr=2e-3))  # another setting: trains
    assert _steps(tmp_path / "c") == ["step-000002", "step-000004"] and len(entries()) == 2
    monkeypatch.setattr(run_cache, "code_digest", lambda: "changed")  # the training code changed: trains
    train(tiny_config(tiny_setup, tmp_path / "d", run_cache=True))
    assert _steps(tmp_path / "d") == ["step-000002", "step-000004"] and len(entries()) == 3
    assert not _same_adapter(first, other)

    train(tiny_config(tiny_setup, tmp_path / "e", run_cache=True, seed=5), stop_after=2)  # unfinished: not kept
    assert len(entries()) == 3
    train(tiny_config(tiny_setup, tmp_path / "f"))  # run_cache off: trains, stores nothing
    assert _steps(tmp_path / "f") == ["step-000002", "step-000004"] and len(entries()) == 3


def test_the_cache_is_left_alone_under_a_launcher_and_by_a_started_run(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("CPWB_CACHE", str(tmp_path / "cache"))
    train(tiny_config(tiny_setup, tmp_path / "a", run_cache=True))
    started = tiny_config(tiny_setup, tmp_path / "b", run_cache=True)
    (tmp_path / "b" / "grpo" / "checkpoint-1").mkdir(parents=True)  # a trainer's own progress: not replaced
    assert run_cache.restore(started) is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not run_cache.usable(tiny_config(tiny_setup, tmp_path / "c", run_cache=True))


def test_a_stored_grpo_run_is_reused_without_trls_trainer(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("CPWB_CACHE", str(tmp_path / "cache"))
    settings = dict(objective="grpo", steps=2, anchors_per_step=2, rl_generations=2, rl_max_new_tokens=4,
                    rl_prompts=8, checkpoint_every=1, run_cache=True)
    first = train(peer_config(tiny_setup, tmp_path / "a", **settings))
    again = train(peer_config(tiny_setup, tmp_path / "b", **settings))
    assert (tmp_path / "a" / "grpo").is_dir() and not (tmp_path / "b" / "grpo").exists()  # TRL did not run
    assert again.metrics == first.metrics and _same_adapter(first, again)
    assert torch.allclose(_logits(again.model, again.tokenizer), _logits(first.model, first.tokenizer), atol=1e-6)


@pytest.mark.parametrize("objective", ["dexperts"])
def test_dexperts_experts_are_runs_of_the_cache(objective):
    """DExperts' alpha curve relies on the run cache: its expert runs must not depend on alpha."""
    from cpwb.core.config import from_dict
    from cpwb.steps.training.config import TrainConfig
    from cpwb.steps.training.dexperts import expert_configs

    low, high = (from_dict(TrainConfig, {"objective": objective, "dexperts_alpha": a, "output_dir": "x"})
                 for a in (1.0, 4.0))
    assert [run_cache.cached_run(c) for c in expert_configs(low)] == [run_cache.cached_run(c)
                                                                      for c in expert_configs(high)]
