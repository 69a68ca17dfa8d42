"""The training-step benchmark: both paths compute the same loss and gradients, and rows land in the CSV."""
from __future__ import annotations

import csv

import pytest
import torch

from cpwb.app import bench
from cpwb.app.bench import BenchConfig

TINY = ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256,
                            tie_word_embeddings=True))


@pytest.fixture
def tiny_shape(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny", TINY)
    return BenchConfig(shape="tiny", anchors=2, positives=2, negatives=2, lora_r=4, repeats=2, warmup=1)


def test_both_paths_give_the_same_phi_and_gradients(tiny_shape):
    model, tokenizer = bench.build_model(tiny_shape, torch.device("cpu"))
    batch = bench.anchor_batches(tiny_shape, tokenizer, 49152, 1)[0]
    assert not batch.attention_mask.all()  # ragged lengths: the naive path pays for padding
    grads = {}
    for name, phi_fn in bench.PHI.items():
        model.zero_grad()
        phi = phi_fn(model, batch)
        phi.sum().backward()
        grads[name] = [p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert len(grads["naive"]) == len(grads["cpwb"]) > 0
    for ours, naive in zip(grads["cpwb"], grads["naive"]):
        torch.testing.assert_close(ours, naive, rtol=1e-3, atol=1e-6)
    assert bench.max_phi_difference(tiny_shape) < 1e-4


def test_run_times_both_paths_and_appends_rows(tiny_shape, tmp_path):
    results = bench.run(tiny_shape, progress=False)
    assert set(results) == {"naive", "cpwb"}
    assert all(len(r.step_seconds) == tiny_shape.repeats and r.real_tokens_per_step > 0 for r in results.values())
    out = tmp_path / "results.csv"
    lines = bench.report(tiny_shape, results, peak_tflops=1.0, path=out)
    assert any(line.startswith("cpwb/naive: tokens/s x") for line in lines)
    rows = list(csv.DictReader(out.open()))
    metrics = {r["metric"] for r in rows}
    assert {"step_time", "real_tokens_per_s", "mfu", "speedup_cpwb_over_naive"} <= metrics


def test_a_bad_setting_is_named():
    with pytest.raises(Exception, match="shape"):
        BenchConfig(shape="gpt-9")


def test_results_figure_plots_the_latest_row_per_config(tiny_shape, tmp_path):
    from cpwb.app.bench_results import append_result, results_figure

    out = tmp_path / "results.csv"
    for value in (1.0, 2.0):
        append_result("train_step", {"path": "cpwb"}, "real_tokens_per_s", "tokens/s", [value], path=out)
    append_result("train_step", {"path": "naive"}, "real_tokens_per_s", "tokens/s", [0.5], path=out)
    bars = results_figure(out).data[0]
    assert sorted(bars.x) == [0.5, 2.0]


def test_versions_name_the_code_commit(tmp_path, monkeypatch):
    import re

    from cpwb.core import provenance

    assert re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", provenance.versions()["git"])  # tests run in a git checkout
    monkeypatch.setattr(provenance.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no git")))
    assert provenance.git_commit() == ""


def test_a_qlora_step_runs_on_the_cpu_with_4bit_linear_layers(tiny_shape, tmp_path):
    pytest.importorskip("bitsandbytes")
    import dataclasses

    config = dataclasses.replace(tiny_shape, load_in_4bit=True, repeats=1, warmup=0)
    model, _ = bench.build_model(config, torch.device("cpu"))
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.quant_type == "nf4"
    results = bench.run(config, progress=False)
    assert all(len(r.step_seconds) == 1 for r in results.values())
