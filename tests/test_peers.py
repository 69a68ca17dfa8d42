"""The training-free peers: ProFS removes exactly its subspace, steering at strength 0 is the base model, both are
reversible, saved and loaded as a run's adapter, and refuse impossible settings before writing anything."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cpwb.core.config import from_dict
from cpwb.core.errors import ConfigError
from cpwb.data.pairs import PairRecord, PairText
from cpwb.engine.adapters import base_of, find_adapter, load_adapter
from cpwb.engine.interventions import (
    Intervention,
    attached,
    detach,
    load_intervention,
    mlp_output,
    profs_directions,
    project_out,
    suspended,
)
from cpwb.engine.nll import decoder_layers, encode
from cpwb.steps.training.batches import limited_and_swapped
from cpwb.steps.training.config import TrainConfig
from cpwb.steps.training.trainer import train
from tests.test_train import tiny_config, tiny_setup  # noqa: F401  (the module fixture)


def peer_config(root, out, **overrides) -> TrainConfig:
    """The tiny run of tests/test_train.py, fitted without the shared embedding and expert caches."""
    return tiny_config(root, out, **{"embedding_cache": False, "run_cache": False, **overrides})


def _logits(model, tokenizer, texts=("you are a fool", "the weather is nice")):
    batch = encode(tokenizer, list(texts))
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


# ------------------------------------------------------------------------------------------------ ProFS algebra
@pytest.mark.parametrize("axis", [0, 1])
def test_projection_is_idempotent_and_leaves_nothing_along_the_directions(axis):
    torch.manual_seed(0)
    directions = torch.linalg.qr(torch.randn(32, 3)).Q  # orthonormal [D, k]
    weight = torch.randn(32, 48) if axis == 0 else torch.randn(48, 32)  # Linear [out=D, in], Conv1D [in, out=D]
    edited = project_out(weight, directions, axis)
    along = directions.T @ edited if axis == 0 else edited @ directions
    assert along.abs().max() < 1e-5
    assert torch.allclose(project_out(edited, directions, axis), edited, atol=1e-6)
    orthogonal = torch.linalg.qr(torch.cat([directions, torch.randn(32, 1)], 1)).Q[:, -1:]  # outside the span
    kept = orthogonal.T @ weight if axis == 0 else weight @ orthogonal
    assert torch.allclose(orthogonal.T @ edited if axis == 0 else edited @ orthogonal, kept, atol=1e-5)


def test_profs_directions_are_orthonormal_and_centring_removes_the_corpus_direction():
    torch.manual_seed(1)
    common = torch.randn(16)
    positive = torch.randn(40, 16) + 5 * common
    negative = positive + torch.randn(40, 16) * 0.1 + torch.outer(torch.rand(40), torch.eye(16)[3]) * 3
    v = profs_directions(positive, negative, rank=2, centering=True)
    assert torch.allclose(v.T @ v, torch.eye(2), atol=1e-5)
    mu = torch.linalg.svd(positive.double(), full_matrices=False).Vh[0].float()
    assert (mu @ v).abs().max() < 1e-4
    assert v[:, 0].abs().argmax() == 3  # the planted toxic direction is found first


# ------------------------------------------------------------------------------------------------ fitted on a run
def test_profs_run_edits_exactly_the_chosen_blocks_and_is_reversible(tiny_setup, tmp_path):  # noqa: F811
    result = train(peer_config(tiny_setup, tmp_path / "profs", objective="profs", edit_layers=[1], edit_rank=2))
    model, tokenizer = result.model, result.tokenizer
    intervention = attached(model)
    assert intervention.method == "profs" and intervention.layers == [1]
    blocks = decoder_layers(model)
    edited, axis = mlp_output(blocks[1])
    v = intervention.tensors[1]
    assert (v.T @ edited.weight).abs().max() < 1e-5  # nothing left along the toxic directions
    untouched = mlp_output(blocks[0])[0].weight.clone()
    after = _logits(model, tokenizer)
    with base_of(model):
        base = _logits(model, tokenizer)
        assert torch.equal(mlp_output(blocks[0])[0].weight, untouched)
        assert (v.T @ mlp_output(blocks[1])[0].weight).abs().max() > 1e-3  # the original weights are back
    assert not torch.allclose(after, base)
    assert torch.equal(_logits(model, tokenizer), after)  # re-applied exactly
    # the saved artefact is the run's adapter: evaluation loads it on a fresh base model, same logits
    loaded, _ = load_adapter(find_adapter(str(result.adapter_dir), tmp_path), model=str(tiny_setup / "model"))
    assert torch.allclose(_logits(loaded, tokenizer), after, atol=1e-5)
    assert (tmp_path / "profs" / "metrics.jsonl").is_file() and result.metrics[0]["step_seconds"] > 0


def test_steering_at_strength_zero_is_the_base_model_and_otherwise_moves_it(tiny_setup, tmp_path):  # noqa: F811
    result = train(peer_config(tiny_setup, tmp_path / "steer", objective="steering", steering_strength=0.0))
    model, tokenizer = result.model, result.tokenizer
    with suspended(model):
        base = _logits(model, tokenizer)
    assert torch.equal(_logits(model, tokenizer), base)
    vectors = load_intervention(result.adapter_dir)
    assert vectors.layers == [1] and vectors.strength == 0.0  # null layer: the middle block of 2
    detach(model)
    Intervention("steering", [1], vectors.tensors, strength=4.0).attach(model)
    assert not torch.allclose(_logits(model, tokenizer), base)
    with base_of(model):
        assert torch.equal(_logits(model, tokenizer), base)
    detach(model)
    assert torch.equal(_logits(model, tokenizer), base)


def test_a_fit_from_warm_embeddings_reports_the_cold_embedding_cost(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("CPWB_CACHE", str(tmp_path / "cache"))
    cold, warm = (train(peer_config(tiny_setup, tmp_path / name, objective="steering", embedding_cache=True)).metrics[0]
                  for name in ("cold", "warm"))
    assert cold["embedding_seconds"] > 0 and warm["embedding_seconds"] == cold["embedding_seconds"]
    assert warm["step_seconds"] >= warm["embedding_seconds"]  # the warm fit itself took next to nothing
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.json"))) == 2  # one pass per side, recorded
    unrecorded = train(peer_config(tiny_setup, tmp_path / "off", objective="steering")).metrics[0]
    assert unrecorded["embedding_seconds"] > 0 and unrecorded["embedding_cache"] is False


@pytest.mark.parametrize("overrides, field_name", [
    ({"objective": "steering", "steering_layer": 2}, "steering_layer"),
    ({"objective": "steering", "steering_layer": -1}, "steering_layer"),
    ({"objective": "profs", "edit_layers": [0, 7]}, "edit_layers"),
    ({"objective": "profs", "edit_first_layer": 7}, "edit_first_layer"),
    ({"objective": "profs", "edit_rank": 65}, "edit_rank"),
])
def test_impossible_peer_settings_fail_naming_the_setting_and_write_nothing(tiny_setup, tmp_path, overrides,  # noqa
                                                                           field_name):
    with pytest.raises(ConfigError) as err:
        train(peer_config(tiny_setup, tmp_path / "run", **overrides))
    assert err.value.field == field_name
    assert not (tmp_path / "run").exists()


def test_edit_first_layer_edits_from_that_block_to_the_last_and_excludes_edit_layers():
    from cpwb.steps.training.editing import chosen_layers

    assert chosen_layers(TrainConfig(objective="profs", edit_first_layer=5), blocks=8, hidden=64) == [5, 6, 7]
    assert chosen_layers(TrainConfig(objective="profs"), blocks=8, hidden=64) == [4, 5, 6, 7]
    with pytest.raises(ConfigError) as err:
        chosen_layers(TrainConfig(objective="profs", edit_first_layer=5, edit_layers=[6]), blocks=8, hidden=64)
    assert err.value.field == "edit_first_layer"
    with pytest.raises(ConfigError, match="edit_first_layer"):
        from_dict(TrainConfig, {"objective": "profs", "edit_first_layer": -1})


def test_a_negative_steering_strength_is_refused_in_the_config():
    with pytest.raises(ConfigError, match="steering_strength"):
        from_dict(TrainConfig, {"objective": "steering", "steering_strength": -1.0})


# ------------------------------------------------------------------------------------------------ data knobs
def _records(n):
    return [PairRecord(id=str(i), anchor=f"a{i}", positives=(PairText(f"p{i}", "h"),),
                       negatives=(PairText(f"n{i}", "h"),)) for i in range(n)]


def test_pairs_limit_and_swap_fraction_draw_with_the_seed_and_default_to_everything_as_is():
    records = _records(50)
    same, swapped = limited_and_swapped(records, TrainConfig())
    assert same == records and swapped == 0
    limited, _ = limited_and_swapped(records, TrainConfig(train_pairs_limit=20, seed=3))
    assert len(limited) == 20 and len({r.id for r in limited}) == 20
    assert limited == limited_and_swapped(records, TrainConfig(train_pairs_limit=20, seed=3))[0]
    assert limited != limited_and_swapped(records, TrainConfig(train_pairs_limit=20, seed=4))[0]
    noisy, n = limited_and_swapped(records, TrainConfig(swap_fraction=0.4, seed=0))
    flipped = [r for r in noisy if r.positives[0].text.startswith("n")]
    assert n == 20 and len(flipped) == 20
    assert all(r.negatives[0].text == f"p{r.id}" for r in flipped)


def test_block_outputs_leave_the_final_norm_out_of_the_last_layer_only(tiny_lm):
    from cpwb.engine.embeddings import hidden_states

    model, tokenizer = tiny_lm
    texts = ["you are a fool", "the weather is nice today"]
    normed = hidden_states(model, tokenizer, texts, layers=[1, 2], pooling="last")
    raw = hidden_states(model, tokenizer, texts, layers=[1, 2], pooling="last", before_final_norm=True)
    assert (normed[1] == raw[1]).all() and not (normed[2] == raw[2]).all()
    with torch.no_grad():  # one token's state: the final norm of the raw one is the normed one
        assert torch.allclose(model.model.norm(torch.from_numpy(raw[2])), torch.from_numpy(normed[2]), atol=1e-5)


# ------------------------------------------------------------------------------------------------ the comparison
def _sweep_rows(objective, variant, seeds, knob=None, values=(None,), **extra):
    return [{"point": f"{variant}-{v}-{s}", "variant": variant, "status": "completed", "objective": objective,
             "seed": s, "toxicity_change": -0.5 + 0.01 * s - (v or 0) * 0.1, "ppl_change": 0.01 + (v or 0) * 0.02,
             "toxicity_change_low": -0.6, "toxicity_change_high": -0.4, "ppl_change_low": 0.0,
             "ppl_change_high": 0.02, "similarity": 0.27, "train_seconds": 100.0, **({knob: v} if knob else {}),
             **extra} for v in values for s in seeds]


def test_comparison_keeps_every_method_and_draws_knob_curves_with_intervals_for_single_seeds():
    import pandas as pd

    from cpwb.analysis import peers as compare

    grid = pd.DataFrame(_sweep_rows("cp", "base", [0, 1, 2]) + _sweep_rows("dpo", "objective=dpo", [0, 1])
                        + _sweep_rows("cp", "alpha=2.0", [0]))  # an ablation, not a compared method
    peers = pd.DataFrame(_sweep_rows("profs", "p", [0], "edit_rank", (1, 2, 4), edit_layers="[]")
                         + _sweep_rows("steering", "s", [0], "steering_strength", (0.5, 2.0), steering_layer=8))
    points = compare.method_points(grid, peers)
    assert sorted(points.method.unique()) == ["CP", "DPO", "ProFS", "steering"] and len(points) == 10
    table = compare.comparison_table(points)
    cp = table[table.method == "CP"].iloc[0]
    assert cp.seeds == 3 and cp["toxicity change"] == "-49 ± 1%"
    profs = table[table.method == "ProFS"]
    assert list(profs.setting) == ["edit_rank=1", "edit_rank=2", "edit_rank=4"]
    assert profs.iloc[0]["toxicity change"] == "-60% [-60, -40]"  # one seed: its paired interval
    assert table[table.method == "steering"].setting.iloc[0] == "block 8; steering_strength=0.5"
    fig = compare.comparison_figure(points)
    curves = {trace.name: trace for trace in fig.data}
    assert curves["ProFS"].mode == "lines+markers" and list(curves["ProFS"].x) == pytest.approx([3, 5, 9])
    assert curves["CP"].mode == "markers"
    front = curves["Pareto front"]
    assert min(front.y) == pytest.approx(-90)  # ProFS rank 4 cuts most
    assert "toxicity change, bilstm-tcc" not in table  # no point was rescored
    peers["toxicity_change:bilstm-tcc"], peers["toxicity_change_low:bilstm-tcc"] = -0.3, -0.5
    peers["toxicity_change_high:bilstm-tcc"] = -0.1
    second = compare.comparison_table(compare.method_points(grid, peers))["toxicity change, bilstm-tcc"]
    assert second.tolist() == ["—"] * 2 + ["-30% [-50, -10]"] * 5  # CP and DPO were not rescored here
    grid["downstream_change"] = [-0.01, 0.02, None, None, None, None]  # measured on 2 of CP's 3 seeds only
    grid["downstream_change_low"], grid["downstream_change_high"] = -0.05, 0.05
    downstream = compare.comparison_table(compare.method_points(grid, peers))["downstream change"]
    assert downstream.iloc[0] == "+0.5 ± 2.1 pts (2 of 3 seeds)" and downstream.iloc[1] == "—"


def test_a_point_at_its_knobs_default_shows_the_default_not_a_missing_value():
    import pandas as pd

    from cpwb.analysis import peers as compare
    from cpwb.steps.training.config import TrainConfig

    # a grid with one setting per method writes no edit_rank column when the point keeps the default
    lee = pd.DataFrame(_sweep_rows("profs", "objective=profs", [0]) + _sweep_rows("dpo", "objective=dpo", [0]))
    points = compare.method_points(None, lee)
    assert points.knob_value.iloc[0] == TrainConfig().edit_rank and pd.isna(points.knob_value.iloc[1])
    assert compare.comparison_table(points).setting.tolist() == [f"edit_rank={TrainConfig().edit_rank}",
                                                                 "default"]


def test_downstream_figures_come_from_the_data_grids_all_pairs_points_of_the_same_method_and_seed():
    import pandas as pd

    from cpwb.analysis import peers as compare

    grid = pd.DataFrame(_sweep_rows("cp", "base", [0, 1]) + _sweep_rows("dpo", "objective=dpo", [0]))
    peers = pd.DataFrame(_sweep_rows("profs", "p", [0], "edit_rank", (1, 4), edit_layers="[]",
                                     downstream_change=-0.07))
    data = pd.DataFrame(  # CP at all pairs on seeds 0 and 2, and on fewer or swapped pairs, which must not count
        _sweep_rows("cp", "base", [0, 2], downstream_change=0.01)
        + _sweep_rows("cp", "l50", [1], train_pairs_limit=50, downstream_change=-0.3)
        + _sweep_rows("cp", "s", [1], swap_fraction=0.2, downstream_change=-0.4)
        + _sweep_rows("profs", "pd", [0], "edit_rank", (1,), downstream_change=0.9))
    for column in ("downstream_change_low", "downstream_change_high"):
        data[column] = data.downstream_change - 0.02 if column.endswith("low") else data.downstream_change + 0.02
    filled = compare.downstream_from(compare.method_points(grid, peers), data)
    cp = filled[filled.method == "CP"].set_index("seed")
    assert cp.downstream_change.loc[0] == pytest.approx(0.01)
    assert cp.downstream_change_high.loc[0] == pytest.approx(0.03)
    assert pd.isna(cp.downstream_change.loc[1])  # seed 1 only on fewer or swapped pairs: not the same model
    assert filled[filled.method == "DPO"].downstream_change.isna().all()  # not in the data grid
    assert filled[filled.method == "ProFS"].downstream_change.tolist() == [-0.07, -0.07]  # measured: kept
    cell = compare.comparison_table(filled).set_index("method").loc["CP", "downstream change"]
    assert cell == "+1.0 pts [-1.0, +3.0] (1 of 2 seeds)"
    assert compare.downstream_from(compare.method_points(grid, peers), None).downstream_change.isna().sum() == 3


def test_generation_costs_take_each_methods_latest_run_and_lora_methods_share_cps():
    import pandas as pd

    from cpwb.analysis import peers as compare

    def row(method, p50, stamp, metric="cpu_seconds_per_1k_tokens", benchmark="method_cost"):
        return {"benchmark": benchmark, "config": json.dumps({"method": method, "prompts": 64}), "metric": metric,
                "p50": p50, "timestamp": stamp}

    rows = pd.DataFrame([row("CP", 30.0, "2026-11-01T00:00:00"), row("CP", 12.5, "2026-12-02T00:00:00"),
                         row("CP", 1.07, "2026-12-02T00:00:00", metric="over_base"),
                         row("DExperts", 40.6, "2026-12-02T00:00:00"), row("SimPO", 13.0, "2026-12-02T00:00:00"),
                         row("base", 99.0, "2026-12-02T00:00:00", benchmark="train_step")])
    costs = compare.generation_costs(rows)
    assert costs == {"CP": 12.5, "DPO": 12.5, "SimPO": 13.0, "GRPO (RL)": 12.5, "RLOO (RL)": 12.5, "DExperts": 40.6}
    points = compare.method_points(pd.DataFrame(_sweep_rows("cp", "base", [0])), None)
    assert compare.comparison_table(points, costs)["generation s / 1k tokens"].tolist() == ["12.5"]


def test_fit_costs_take_each_measured_methods_latest_fit_and_add_a_column():
    import pandas as pd

    from cpwb.analysis import peers as compare

    def row(method, metric, p50, stamp):
        return {"benchmark": "fit_cost", "config": json.dumps({"method": method, "steps": 200}), "metric": metric,
                "p50": p50, "timestamp": stamp}

    rows = pd.DataFrame([row("CP", "cpu_seconds_per_fit", 900.0, "2026-11-01T00:00:00"),
                         row("CP", "cpu_seconds_per_fit", 410.0, "2026-12-03T00:00:00"),
                         row("CP", "cpu_seconds_per_step", 2.0, "2026-12-03T00:00:00"),
                         row("ProFS", "cpu_seconds_per_fit", 35.0, "2026-12-03T00:00:00")])
    fit = compare.fit_costs(rows)
    assert fit == {"CP": 410.0, "ProFS": 35.0}  # DPO is not given CP's figure: its steps do other work
    grid = pd.DataFrame(_sweep_rows("cp", "base", [0]) + _sweep_rows("dpo", "objective=dpo", [0]))
    table = compare.comparison_table(compare.method_points(grid, None), None, fit)
    assert table["fit CPU s, one machine"].tolist() == ["410", "—"]
    assert table["fit seconds"].tolist() == ["100", "100"]  # what the points recorded stays beside it


def _fit_cost_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fit_cost", Path(__file__).parents[1] / "benchmarks" / "fit_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fit_cost_benchmark_fits_each_method_with_its_sweep_points_settings_from_nothing(monkeypatch):
    script = _fit_cost_script()
    monkeypatch.chdir(Path(__file__).parents[1])
    configs = {name: script.point_config(spec) for name, spec in script.METHODS.items()}
    assert {name: c.objective for name, c in configs.items()} == {
        "CP": "cp", "DPO": "dpo", "SimPO": "simpo", "ProFS": "profs", "steering": "steering",
        "DExperts": "dexperts", "GRPO (RL)": "grpo"}
    assert not any(c.run_cache or c.embedding_cache for c in configs.values())  # nothing reused
    assert {c.steps for c in configs.values()} == {200}
    with pytest.raises(SystemExit, match="no point with id 'nope'"):
        script.point_config("configs/peers.yaml:nope")
    # a step = the difference of a short and a longer fit over the added steps; the fit extrapolates to 200
    monkeypatch.setattr(script, "cpu_seconds", lambda config: 12.0 + 3.0 * config.steps)
    assert script.measure(configs["CP"], 2, 6) == pytest.approx((3.0, 612.0, 200))
    monkeypatch.setattr(script, "cpu_seconds", lambda config: 40.0)
    assert script.measure(configs["ProFS"], 2, 6) == (40.0, 40.0, 1)  # fitted whole, once


def test_the_fit_cost_benchmark_times_real_fits_and_leaves_nothing_behind(tiny_setup, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    script = _fit_cost_script()
    fitted = []

    def spy(config):
        fitted.append((config.steps, config.output_dir))
        assert Path(config.output_dir).is_dir()  # a fresh temporary folder, there while it fits
        return train(config)

    monkeypatch.setattr(script, "train", spy)
    config = peer_config(tiny_setup, tmp_path / "unused", steps=5)
    step, whole, steps = script.measure(config, 1, 2)
    assert [n for n, _ in fitted] == [1, 1, 3]  # the warm-up, the short and the longer fit
    assert len({folder for _, folder in fitted}) == 3 and not any(Path(f).exists() for _, f in fitted)
    assert step >= 0 and whole > 0 and steps == 5  # tiny steps: the difference is within timing noise
    assert not (tmp_path / "unused").exists()


# ------------------------------------------------------------------------------------------------ DExperts
@pytest.fixture(scope="module")
def dexperts_run(tiny_setup, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("dexperts") / "run"
    return train(peer_config(tiny_setup, out, objective="dexperts", steps=2, dexperts_alpha=1.5, lr=5e-2))


def test_a_dexperts_alpha_curve_trains_its_experts_once_and_keeps_their_training_time(tiny_setup, tmp_path,  # noqa
                                                                                      monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("CPWB_CACHE", str(tmp_path / "cache"))
    run = {name: train(peer_config(tiny_setup, tmp_path / name, objective="dexperts", steps=2, checkpoint_every=1,
                                   run_cache=True, **extra))
           for name, extra in (("a", {"dexperts_alpha": 1.0}), ("b", {"dexperts_alpha": 3.0}),
                               ("c", {"dexperts_alpha": 3.0, "lr": 2e-3}))}
    steps = {name: sorted(p.name for p in (tmp_path / name / "expert" / "checkpoints").iterdir()) for name in run}
    assert steps["a"] == steps["c"] == ["step-000001", "step-000002"]  # trained
    assert steps["b"] == ["step-000002"]  # resumed from the stored last step: no training of its own
    assert [m["step_seconds"] for m in run["b"].metrics] == [m["step_seconds"] for m in run["a"].metrics]
    for side in ("expert", "anti"):
        weights = {name: load_file(run[name].adapter_dir / side / "adapter_model.safetensors") for name in "ab"}
        assert weights["a"].keys() == weights["b"].keys()
        assert all(torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert json.loads((run["b"].adapter_dir / "dexperts.json").read_text())["alpha"] == 3.0
    assert len(list((tmp_path / "cache" / "runs").iterdir())) == 4  # expert and anti of two settings


def _nll_logits(model, tokenizer):
    from cpwb.engine.nll import texts_nll

    return texts_nll(model, tokenizer, ["you are a fool", "the weather is nice today"]).phi


def test_dexperts_run_trains_both_experts_and_saves_a_loadable_artefact(dexperts_run, tiny_setup):  # noqa: F811
    from cpwb.engine.dexperts import DExpertsLM

    folder = dexperts_run.adapter_dir
    assert (folder / "dexperts.json").is_file() and (folder / "expert").is_dir() and (folder / "anti").is_dir()
    assert {m["expert"] for m in dexperts_run.metrics} == {"expert", "anti"} and len(dexperts_run.metrics) == 4
    loaded, tokenizer = load_adapter(find_adapter(str(folder), folder), model=str(tiny_setup / "model"))
    assert isinstance(loaded, DExpertsLM) and loaded.alpha == 1.5
    assert torch.allclose(_logits(loaded, tokenizer), _logits(dexperts_run.model, tokenizer), atol=1e-5)


def test_dexperts_logits_are_base_plus_alpha_times_expert_minus_anti_and_alpha_zero_is_the_base(dexperts_run):
    model, tokenizer = dexperts_run.model, dexperts_run.tokenizer
    peft = model.peft
    with peft.disable_adapter():
        base = _logits(peft, tokenizer)
    peft.set_adapter("expert")
    expert = _logits(peft, tokenizer)
    peft.set_adapter("anti")
    anti = _logits(peft, tokenizer)
    assert not torch.allclose(expert, anti)  # the two adapters learned different things
    assert torch.allclose(_logits(model, tokenizer), base + 1.5 * (expert - anti), atol=1e-4)
    with base_of(model):
        assert torch.allclose(_logits(model, tokenizer), base, atol=1e-5)
        base_phi = _nll_logits(model, tokenizer)
    model.alpha = 0.0
    try:
        assert torch.allclose(_logits(model, tokenizer), base, atol=1e-5)
        assert abs(_nll_logits(model, tokenizer) - base_phi).max() < 1e-5  # phi sees the combination too
    finally:
        model.alpha = 1.5
    assert abs(_nll_logits(model, tokenizer) - base_phi).max() > 1e-4


def test_dexperts_cached_greedy_decoding_matches_recomputing_the_combined_logits(dexperts_run):
    from cpwb.engine.generate import generate, prompt_ids

    model, tokenizer = dexperts_run.model, dexperts_run.tokenizer
    prompts = ["you are such a", "the weather today"]
    fast = generate(model, tokenizer, prompts, max_new_tokens=5)
    for prompt, (text,) in zip(prompts, fast):
        ids = torch.tensor([prompt_ids(tokenizer, prompt)])
        for _ in range(5):  # no cache: the whole sequence through the combined forward each step
            with torch.no_grad():
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        expected = tokenizer.decode(ids[0, -5:], skip_special_tokens=True)
        assert text == expected


def test_lm_eval_scores_a_dexperts_model_on_its_combined_distribution(dexperts_run):
    from cpwb.steps.evaluation.harness import _documents, run_harness

    model, tokenizer = dexperts_run.model, dexperts_run.tokenizer
    _, questions = run_harness(model, tokenizer, ("piqa",), limit=2, batch_size=2)
    doc = _documents("piqa")[0]
    context = f"Question: {doc['goal']}\nAnswer:"
    for choice, found in zip((doc["sol1"], doc["sol2"]), questions.loglik[0]):  # lm-eval's own pair encoding
        whole = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
        start = len(tokenizer(context, add_special_tokens=False).input_ids)
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
        assert found == pytest.approx(sum(logp[i - 1, whole[i]].item() for i in range(start, len(whole))), abs=1e-3)
    with model.peft.disable_adapter():  # the base through lm-eval's own HFLM path
        _, plain = run_harness(model.peft.get_base_model(), tokenizer, ("piqa",), limit=2, batch_size=2)
    model.alpha = 0.0
    try:
        _, at_zero = run_harness(model, tokenizer, ("piqa",), limit=2, batch_size=2)
    finally:
        model.alpha = 1.5
    assert sum(at_zero.loglik, []) == pytest.approx(sum(plain.loglik, []), abs=1e-4)
    assert abs(questions.loglik[0][0] - plain.loglik[0][0]) > 1e-3


def test_a_generation_task_file_is_refused_for_dexperts_before_lm_eval_runs(dexperts_run, tmp_path):
    import yaml

    from cpwb.core.errors import InputError
    from cpwb.steps.evaluation.harness import run_harness

    task = tmp_path / "gen.yaml"
    task.write_text(yaml.safe_dump({"task": "gen", "dataset_path": "json", "output_type": "generate_until",
                                    "doc_to_text": "{{q}}", "doc_to_target": "{{a}}", "doc_to_choice": "x"}))
    with pytest.raises(InputError, match="generation task does not run on a DExperts") as err:
        run_harness(dexperts_run.model, dexperts_run.tokenizer, (), task_files=[task])
    assert "gen.yaml" in str(err.value) and "output_type" in str(err.value)


def test_data_figure_orders_pair_counts_with_all_last_and_averages_seeds():
    import pandas as pd

    from cpwb.analysis import peers as compare

    rows = [{"status": "completed", "objective": o, "train_pairs_limit": n, "seed": s,
             "toxicity_change": -0.1 * (1 + (n or 1000) / 100) + 0.01 * s, "ppl_change": 0.01}
            for o in ("cp", "profs") for n in (0, 50, 200) for s in (0, 1)]
    fig = compare.data_figure(pd.DataFrame(rows), "train_pairs_limit")
    cp = [t for t in fig.data if t.name == "CP" and t.showlegend][0]
    assert list(cp.x) == ["50", "200", "all"]
    assert cp.y[0] == pytest.approx(100 * (-0.15 + 0.005))


def test_one_data_grid_gives_both_figures_sharing_the_all_pairs_unswapped_point():
    import pandas as pd

    from cpwb.analysis import peers as compare
    from cpwb.app.sweep import expand, load_grid

    grid = load_grid(Path(__file__).resolve().parents[1] / "configs" / "peers_data.yaml")
    variants = {p.variant for p in expand(grid)}
    assert len(variants) == 15  # 3 methods x (3 sizes + 2 swap shares): the common point is held once
    rows = [{"status": "completed", "objective": "cp", "train_pairs_limit": n, "swap_fraction": f, "seed": 0,
             "toxicity_change": -0.5 + f - n / 1000, "ppl_change": 0.01}
            for n, f in ((50, 0.0), (200, 0.0), (0, 0.0), (0, 0.2), (0, 0.4))]
    size = [t for t in compare.data_figure(pd.DataFrame(rows), "train_pairs_limit").data if t.showlegend][0]
    noise = [t for t in compare.data_figure(pd.DataFrame(rows), "swap_fraction").data if t.showlegend][0]
    assert list(size.x) == ["50", "200", "all"] and list(noise.x) == ["0", "0.2", "0.4"]
    assert list(noise.y) == pytest.approx([-50.0, -30.0, -10.0])  # the swapped rows never enter the size curve
    assert list(size.y) == pytest.approx([-55.0, -70.0, -50.0])


# ------------------------------------------------------------------------------------------------ the RL baseline
class _FixedScorer:
    name = "fixed"

    def score(self, texts, progress=False):
        return [0.1 * (len(t) % 7) for t in texts]


def test_the_rl_reward_is_the_negated_scorer_output():
    from cpwb.steps.training.rl import toxicity_reward

    reward = toxicity_reward(_FixedScorer())
    texts = ["a", "abc", "abcdefgh", ""]
    assert reward(completions=texts, prompts=["p"] * 4) == [-s for s in _FixedScorer().score(texts)]
    chat = [[{"role": "assistant", "content": t}] for t in texts]  # conversational completions: their text
    assert reward(completions=chat) == reward(completions=texts)


@pytest.mark.parametrize("objective", ["grpo", "rloo"])
def test_rl_recomputes_activations_only_when_cpwbs_setting_asks(objective, tmp_path):
    """TRL's GRPO and RLOO configs turn gradient checkpointing on by default; cpwb's `gradient_checkpointing`
    (off) decides, as for every other objective: on a CPU it saves no memory worth having and costs about a third
    of the backward pass."""
    from cpwb.steps.training.rl import rl_settings

    config = from_dict(TrainConfig, {"objective": objective})
    assert rl_settings(config, tmp_path, "cpu").gradient_checkpointing is False
    assert rl_settings(replace(config, gradient_checkpointing=True), tmp_path, "cpu").gradient_checkpointing is True


def test_rl_prompts_are_never_evaluation_prompts():
    from cpwb.data.corpora import load_rtp
    from cpwb.steps.training.rl import rl_prompts

    prompts = rl_prompts()
    evaluated = {p.text for p in load_rtp("challenging")} | {p.text for p in load_rtp("nontoxic", limit=500)}
    assert len(prompts) == 597 and not set(prompts) & evaluated


def test_a_reward_scorer_that_does_not_load_fails_naming_the_setting_and_writes_nothing(tiny_setup,  # noqa: F811
                                                                                        tmp_path):
    with pytest.raises(ConfigError) as err:
        train(peer_config(tiny_setup, tmp_path / "run", objective="grpo", rl_scorer="hf:/no/such/folder"))
    assert err.value.field == "rl_scorer" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("objective", ["grpo", "rloo"])
def test_rl_trains_a_lora_policy_through_trl_and_saves_it_as_the_runs_adapter(tiny_setup, tmp_path,  # noqa: F811
                                                                               objective, monkeypatch):
    config = peer_config(tiny_setup, tmp_path / "rl", objective=objective, steps=2, anchors_per_step=2,
                         rl_generations=2, rl_max_new_tokens=4, rl_prompts=8, checkpoint_every=1)
    result = train(config)
    assert (result.adapter_dir / "adapter_config.json").is_file() and len(result.metrics) == 2
    assert any((result.run_dir / objective).glob("checkpoint-*"))  # TRL's own trainer of that name ran
    assert all("reward" in m and m["step_seconds"] > 0 and m["peak_memory_mb"] > 0 for m in result.metrics)
    resumed = train(config, resume=True)  # finished: the same policy and metrics, no step more
    assert resumed.metrics == result.metrics
    assert torch.allclose(_logits(resumed.model, resumed.tokenizer), _logits(result.model, result.tokenizer),
                          atol=1e-5)
    loaded, tokenizer = load_adapter(result.adapter_dir, model=str(tiny_setup / "model"))
    with base_of(loaded):
        base = _logits(loaded, tokenizer)
    assert not torch.allclose(_logits(loaded, tokenizer), base)  # the policy moved
    # stopped after its final checkpoint, before the adapter: the re-run trains no step more and saves the policy
    shutil.rmtree(result.adapter_dir)
    again = train(config, resume=True)
    assert [m["step"] for m in again.metrics] == [1, 2] and (again.adapter_dir / "adapter_config.json").is_file()
    assert torch.allclose(_logits(again.model, again.tokenizer), _logits(result.model, result.tokenizer), atol=1e-5)
    import trl

    # stopped in step 2: the re-run resumes TRL's step-1 checkpoint, its states (rng, optimizer) loaded without pickle
    trainer_type = getattr(trl, "GRPOTrainer" if objective == "grpo" else "RLOOTrainer")
    step, calls = trainer_type.training_step, []

    def stopping_step(self, *args, **kwargs):
        calls.append(1)
        if self.state.global_step >= 1:
            raise KeyboardInterrupt("stopped")
        return step(self, *args, **kwargs)

    stopped = replace(config, output_dir=str(tmp_path / "stopped"))
    monkeypatch.setattr(trainer_type, "training_step", stopping_step)
    with pytest.raises(KeyboardInterrupt):
        train(stopped)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "stopped" / objective).glob("checkpoint-*")] == ["checkpoint-1"]
    loads, torch_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only", True)) or torch_load(*a, **k))
    resumed = train(stopped, resume=True)
    monkeypatch.undo()
    assert loads and all(weights_only is True for weights_only in loads)
    assert [m["step"] for m in resumed.metrics] == [1, 2] and resumed.metrics[0]["loss"] == result.metrics[0]["loss"]


def test_the_adapter_setting_accepts_what_evaluation_loads():
    from cpwb.core.settings import ADAPTER_MARKERS
    from cpwb.engine.adapters import ADAPTER_CONFIG
    from cpwb.engine.dexperts import DEXPERTS_FILE
    from cpwb.engine.interventions import INTERVENTION_FILE

    assert ADAPTER_MARKERS == (ADAPTER_CONFIG, INTERVENTION_FILE, DEXPERTS_FILE)


def test_length_control_keeps_a_length_confound_out_of_the_profs_directions():
    torch.manual_seed(2)
    n, d = 200, 16
    positive = torch.randn(n, d)
    lengths = torch.randint(-5, 6, (n,)).double()
    toxic = torch.rand(n)  # how toxic each pair's negative is: a smaller planted direction (dim 3)
    negative = positive - 2.0 * torch.outer(lengths.float(), torch.eye(d)[7]) + torch.outer(toxic, torch.eye(d)[3])
    plain = profs_directions(positive, negative, rank=1, centering=False)
    controlled = profs_directions(positive, negative, rank=1, centering=False, length_difference=lengths)
    assert plain[:, 0].abs().argmax() == 7  # without the control the length direction comes first
    assert controlled[:, 0].abs().argmax() == 3 and controlled[7, 0].abs() < 1e-6


def test_the_lee2024_peers_grid_evaluates_at_the_lee2024_presets_sizes(default_lm):
    """configs/peers_lee2024.yaml is the quick evaluation at the preset's sizes: every RTP-challenging prompt, 20
    greedy tokens, and every WikiText-2 window of 512 tokens, stride 256 (not a subset)."""
    import yaml

    from cpwb.app.sweep import expand, load_grid
    from cpwb.data.corpora import load_rtp, load_wikitext2_test
    from cpwb.steps.evaluation.likelihood import strided_windows, token_stream

    root = Path(__file__).resolve().parents[1] / "configs"
    grid, preset = load_grid(root / "peers_lee2024.yaml"), yaml.safe_load((root / "eval_lee2024.yaml").read_text())
    assert grid.base["rtp_prompts"] == preset["greedy_prompts"] == len(load_rtp("challenging"))
    assert grid.base["max_new_tokens"] == preset["max_new_tokens"] and preset["wikitext_windows"] is None
    ids = token_stream(default_lm[1], load_wikitext2_test())
    assert grid.base["wikitext_windows"] == len(strided_windows(len(ids), 512, 256))
    objectives = {p.parameters["objective"] for p in expand(grid)}
    assert objectives == {"cp", "dpo", "simpo", "profs", "steering", "dexperts", "grpo"}  # rloo: on request
