"""Embedding spaces: pooling that ignores padding, the on-disk cache, layer indices, separation numbers, figures."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from cpwb.analysis.maps import (
    adapter_run,
    layer_sweep,
    layer_sweep_figure,
    probe_scores,
    project,
    projection_figure,
    silhouette,
    space_separation,
)
from cpwb.core.errors import InputError
from cpwb.data.pairs import NON_TOXIC, TOXIC, PairRecord, PairText, pair_texts
from cpwb.engine.embeddings import hidden_states, model_embeddings, model_fingerprint, resolve_layers
from cpwb.steps.training.batches import load_training_pairs
from cpwb.steps.training.config import TrainConfig
from tests.conftest import make_tiny_lm

TEXTS = ["you are a complete idiot and everyone knows it", "thanks", "the weather is nice today, isn't it?"]


def _record(i: int, n_positives: int = 2) -> PairRecord:
    neutral = [f"neutral text {i} version {k}" for k in range(n_positives)]
    return PairRecord(f"p{i}", neutral[0], tuple(PairText(t, "human") for t in neutral),
                      (PairText(f"toxic text {i}", "human"),), group="g" if i % 2 else None)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_a_text_embeds_the_same_alone_and_in_a_padded_batch(tiny_lm, pooling):
    model, tokenizer = tiny_lm
    together = hidden_states(model, tokenizer, TEXTS, layers=[1, 2], pooling=pooling, batch_size=3)
    for i, text in enumerate(TEXTS):
        alone = hidden_states(model, tokenizer, [text], layers=[1, 2], pooling=pooling)
        for layer in (1, 2):
            np.testing.assert_allclose(alone[layer][0], together[layer][i], atol=1e-5)
    assert not np.allclose(together[2][0], together[2][2])


def test_mean_pooling_of_layer_0_is_the_mean_token_embedding_without_the_start_token(tiny_lm):
    model, tokenizer = tiny_lm
    ids = tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    expected = model.get_input_embeddings().weight[ids].mean(0).detach().numpy()
    np.testing.assert_allclose(hidden_states(model, tokenizer, TEXTS[:1], layers=[0])[0][0], expected, atol=1e-6)
    last = hidden_states(model, tokenizer, TEXTS[:1], layers=[0], pooling="last")[0][0]
    np.testing.assert_allclose(last, model.get_input_embeddings().weight[ids[-1]].detach().numpy(), atol=1e-6)


def test_layers_resolve_negative_indices_and_refuse_out_of_range(tiny_lm):
    model, _ = tiny_lm
    assert resolve_layers(model, None) == [0, 1, 2]
    assert resolve_layers(model, [-1, 2, 0]) == [2, 0]
    with pytest.raises(InputError, match="layers: layer 3 out of range"):
        resolve_layers(model, [3])


def test_bad_texts_and_pooling_are_refused_by_name(tiny_lm):
    model, tokenizer = tiny_lm
    with pytest.raises(InputError, match=r"texts\[1\]: must be a non-empty string"):
        hidden_states(model, tokenizer, ["fine", "  "])
    with pytest.raises(InputError, match="pooling: must be one of"):
        hidden_states(model, tokenizer, ["fine"], pooling="max")


def _count_forwards(model) -> list[int]:
    calls: list[int] = []
    model.get_decoder().register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_cache_serves_repeats_and_separates_layers_texts_and_adapter(fresh_tiny_lm, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, tokenizer = fresh_tiny_lm
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    calls = _count_forwards(base)
    first = model_embeddings(model, tokenizer, TEXTS, layers=[1], use_adapter=False, cache_dir=tmp_path)
    assert len(calls) == 1
    again = model_embeddings(model, tokenizer, TEXTS, layers=[1], use_adapter=False, cache_dir=tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(first[1], again[1])
    with_adapter = model_embeddings(model, tokenizer, TEXTS, layers=[1], use_adapter=True, cache_dir=tmp_path)
    assert len(calls) == 2 and not np.allclose(with_adapter[1], first[1])
    model_embeddings(model, tokenizer, TEXTS, layers=[1, 2], use_adapter=False, cache_dir=tmp_path)
    model_embeddings(model, tokenizer, TEXTS[:2], layers=[1], use_adapter=False, cache_dir=tmp_path)
    assert len(calls) == 4
    with model.disable_adapter():
        np.testing.assert_allclose(hidden_states(model, tokenizer, TEXTS, layers=[1])[1], first[1], atol=1e-6)
    assert len(list(tmp_path.glob("hidden-*.npy"))) == 4


def test_a_torn_cache_file_is_recomputed(fresh_tiny_lm, tmp_path):
    model, tokenizer = fresh_tiny_lm
    first = model_embeddings(model, tokenizer, TEXTS, layers=[2], cache_dir=tmp_path)
    (cached,) = tmp_path.glob("hidden-*.npy")
    cached.write_bytes(cached.read_bytes()[:50])
    np.testing.assert_array_equal(model_embeddings(model, tokenizer, TEXTS, layers=[2], cache_dir=tmp_path)[2],
                                  first[2])


def test_fingerprint_follows_the_weights_of_unnamed_models(default_lm):
    tokenizer = default_lm[1]
    assert model_fingerprint(make_tiny_lm(tokenizer, seed=0)) == model_fingerprint(make_tiny_lm(tokenizer, seed=0))
    assert model_fingerprint(make_tiny_lm(tokenizer, seed=0)) != model_fingerprint(make_tiny_lm(tokenizer, seed=1))


def test_pair_texts_labels_roles_and_skips_the_anchor_among_positives():
    frame = pair_texts([_record(0, 3), _record(1, 1)], positives_per_pair=1, with_anchor=True)
    assert frame.role.tolist() == ["anchor", "positive", "negative", "anchor", "negative"]
    assert frame.label.tolist() == [NON_TOXIC, NON_TOXIC, TOXIC, NON_TOXIC, TOXIC]
    assert frame.text[1] == "neutral text 0 version 1"
    assert len(pair_texts([_record(i) for i in range(5)], n_pairs=2, with_anchor=True)) == 6
    with pytest.raises(InputError, match="negatives_per_pair"):
        pair_texts([_record(0)], negatives_per_pair=0)


def _blobs(distance: float, n: int = 40, dim: int = 20, seed: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    """n toxic and n non-toxic points: Gaussian blobs `distance` apart along the diagonal, one pair per index."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * n, dim))
    x[:n] += distance / np.sqrt(dim)
    labels = [TOXIC] * n + [NON_TOXIC] * n
    return x, labels, [f"p{i}" for i in range(n)] * 2


def test_probe_and_silhouette_see_separable_data_and_not_random_labels():
    x, labels, groups = _blobs(distance=12.0)
    assert probe_scores(x, labels, groups).min() > 0.97
    assert silhouette(x, labels) > 0.3
    shuffled = list(np.random.default_rng(1).permutation(labels))
    assert 0.3 < probe_scores(x, shuffled, groups).mean() < 0.7
    assert abs(silhouette(x, shuffled)) < 0.05


def test_probe_refuses_too_few_texts_per_class():
    x, labels, groups = _blobs(distance=5.0, n=3)
    with pytest.raises(InputError, match="folds: 5 folds need"):
        probe_scores(x, labels, groups)
    with pytest.raises(InputError, match="labels: needs both"):
        probe_scores(x, [TOXIC] * len(labels))


def test_layer_sweep_rows_and_figure():
    near, labels, groups = _blobs(distance=0.5)
    far, _, _ = _blobs(distance=12.0)
    sweep = layer_sweep({"base": {0: near, 1: far}, "CP": {0: far, 1: far}}, labels, groups)
    assert sweep[["model", "layer"]].values.tolist() == [["base", 0], ["base", 1], ["CP", 0], ["CP", 1]]
    assert sweep.probe_accuracy[2] > sweep.probe_accuracy[0]
    figure = layer_sweep_figure(sweep, space_separation(near, labels, groups))
    assert [t.name for t in figure.data] == ["base", "CP", "base", "CP"]


def test_projection_figure_panels_groups_and_anchor_lines():
    frame = pair_texts([_record(0), _record(1)], with_anchor=True)
    frame["toxicity"] = np.linspace(0, 1, len(frame))
    coords = np.arange(2 * len(frame), dtype=float).reshape(-1, 2)
    figure = projection_figure(frame, {"base": coords, "CP": coords + 1}, "t", lines=True)
    markers = [t for t in figure.data if t.mode == "markers"]
    assert len(markers) == 6 and {t.name for t in markers} == {"non-toxic · anchor", "non-toxic · positive",
                                                              "toxic · negative"}
    line = next(t for t in figure.data if t.mode == "lines")
    assert list(line.x[:2]) == [coords[0, 0], coords[2, 0]]  # pair 0: anchor (row 0) to its negative (row 2)
    assert "toxicity 0.40" in markers[2].text[0]
    figure_3d = projection_figure(frame, {"joint": np.hstack([coords, coords[:, :1]])}, "t")
    assert figure_3d.data[0].type == "scatter3d"


@pytest.mark.slow
def test_umap_projection_is_seeded_and_shares_coordinates():
    base, labels, _ = _blobs(distance=12.0, n=20)
    cp = base + 0.01
    fitted = project({"base": base, "CP": cp}, fit_on="base", seed=3)
    assert fitted["base"].shape == fitted["CP"].shape == (40, 2)
    np.testing.assert_array_equal(fitted["base"], project({"base": base}, fit_on="base", seed=3)["base"])
    toxic = np.array(labels) == TOXIC
    gap = np.linalg.norm(fitted["base"][toxic].mean(0) - fitted["base"][~toxic].mean(0))
    assert gap > 2 * fitted["base"][toxic].std(0).max()  # the blobs stay apart in the map
    assert np.median(np.linalg.norm(fitted["CP"] - fitted["base"], axis=1)) < 0.5 * gap
    joint = project({"base": base, "CP": cp}, fit_on="joint", n_components=3)
    assert joint["CP"].shape == (40, 3)
    with pytest.raises(InputError, match="fit_on"):
        project({"base": base}, fit_on="CP")


def test_adapter_run_trains_only_without_an_adapter_and_prefers_notebook_02s(tmp_path, default_lm):
    tokenizer = default_lm[1]
    folder = tmp_path / "model"
    make_tiny_lm(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    trained = adapter_run("", tmp_path / "run", model=str(folder), steps=1)
    assert trained.adapter_dir == tmp_path / "run" / "train-04" / "adapter"
    assert (trained.adapter_dir / "adapter_model.safetensors").is_file() and trained.model == str(folder)
    train_ids = {r.id for r in load_training_pairs(TrainConfig(model=str(folder)))[0]}
    assert trained.heldout and not train_ids & {r.id for r in trained.heldout}
    shutil.copytree(trained.adapter_dir.parent, tmp_path / "run" / "train")
    shutil.rmtree(trained.adapter_dir.parent)
    assert adapter_run("", tmp_path / "run").adapter_dir == tmp_path / "run" / "train" / "adapter"
    assert not (tmp_path / "run" / "train-04").exists()  # nothing trained: notebook 02's adapter is used
    with pytest.raises(InputError, match="adapter: not an adapter folder"):
        adapter_run(str(tmp_path / "model"), tmp_path / "run")
