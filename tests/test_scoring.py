"""Toxicity scorers and sentence similarity: equal to the packages' TensorFlow outputs, safe to load, accurate."""
from __future__ import annotations

import io
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cpwb.core.errors import AssetError, InputError
from cpwb.engine import bilstm as toxicity_lstm
from cpwb.engine.bilstm import RestrictedUnpickler, load_bilstm
from cpwb.engine.scoring import BiLSTMScorer, SentenceEmbedder, available_scorers, load_toxicity_scorer

DATA = Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "scoring_reference.json").read_text(encoding="utf-8"))
PARADETOX = [Path(__file__).parents[1] / "data" / "paradetox" / "paradetox.tsv",
             Path("/work/shared/data/paradetox/paradetox.tsv")]


@pytest.fixture(scope="session")
def embedder() -> SentenceEmbedder:
    """The packaged all-MiniLM-L6-v2, loaded once."""
    return SentenceEmbedder.from_pretrained()


@pytest.mark.parametrize("name", ["bilstm-toxblock", "bilstm-tcc"])
def test_matches_tensorflow_reference(name: str) -> None:
    """Token ids equal the Keras tokenizer's and probabilities equal TensorFlow's within 1e-4, empty text included."""
    expected = REFERENCE["backends"][name]
    model, tokenizer, _ = load_bilstm(name)
    ids = tokenizer.encode(REFERENCE["texts"])
    np.testing.assert_array_equal(ids, np.array(expected["sequences"]))
    with torch.inference_mode():
        probs = model(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(probs, np.array(expected["probs"]), atol=1e-4, rtol=0)


class _RunsCode:
    """A pickle payload that would call os.system when unpickled by a plain pickle.load."""

    def __reduce__(self) -> tuple:
        return os.system, ("echo should-never-run",)


@pytest.mark.parametrize("payload", [_RunsCode(), eval])
def test_restricted_unpickler_refuses_other_globals(payload: object) -> None:
    """Only the tokenizer whitelist resolves: os.system or eval in a pickle is refused before anything runs."""
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(AssetError, match="refusing to unpickle"):
        RestrictedUnpickler(io.BytesIO(data)).load()


def test_conversion_is_cached_and_tampering_rebuilds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second load reuses the cache; a flipped byte in model.safetensors rebuilds it instead of using it.

    Conversion must not need TensorFlow or Keras: they are made unimportable here.
    """
    monkeypatch.setenv("CPWB_CACHE", str(tmp_path))
    for module in ("tensorflow", "tf_keras", "keras", "keras_preprocessing"):
        monkeypatch.setitem(sys.modules, module, None)
    builds = []
    real_convert = toxicity_lstm.convert
    monkeypatch.setattr(toxicity_lstm, "convert", lambda *a, **k: (builds.append(1), real_convert(*a, **k)))
    ids = torch.from_numpy(load_bilstm("bilstm-tcc")[1].encode(["you are an idiot", "thanks a lot"]))
    first = load_bilstm("bilstm-tcc")[0](ids).detach()
    assert len(builds) == 1
    load_bilstm("bilstm-tcc")
    assert len(builds) == 1
    weights = toxicity_lstm.converted_dir("bilstm-tcc") / "model.safetensors"
    assert weights.is_relative_to(tmp_path) and len(builds) == 1
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    again = load_bilstm("bilstm-tcc")[0](ids).detach()
    assert len(builds) == 2
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_unknown_scorer_lists_names() -> None:
    """A typo names every scorer that exists."""
    with pytest.raises(AssetError) as error:
        load_toxicity_scorer("perspective")
    for name in available_scorers():
        assert name in str(error.value)


def test_detoxify_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the optional detoxify package the error says how to install it."""
    monkeypatch.setitem(sys.modules, "detoxify", None)
    with pytest.raises(AssetError, match="pip install detoxify"):
        load_toxicity_scorer("detoxify", checkpoint="model.ckpt", huggingface_config_path="bert-base-uncased")


def test_scores_are_batched_and_validated() -> None:
    """Batch size changes nothing; empty texts are scored; a bare string is refused; labels come as columns."""
    scorer = load_toxicity_scorer()
    texts = REFERENCE["texts"]
    small = scorer.score(texts, batch_size=3)
    np.testing.assert_allclose(small, scorer.score(texts, batch_size=256), atol=1e-6, rtol=0)
    assert small.shape == (len(texts),) and ((small >= 0) & (small <= 1)).all()
    assert isinstance(scorer, BiLSTMScorer) and scorer.name == "bilstm-toxblock"
    table = scorer.scores_by_label(texts[:4])
    assert list(table.columns) == list(scorer.labels) and len(table) == 4
    np.testing.assert_allclose(table["toxic"], small[:4], atol=1e-6, rtol=0)
    with pytest.raises(InputError):
        scorer.score("a single string")


def test_default_scorer_separates_paradetox_held_out() -> None:
    """ROC AUC >= 0.85 on the last 500 ParaDetox rows: toxic sentence vs its first neutral rewrite."""
    path = next((p for p in PARADETOX if p.exists()), None)
    if path is None:
        pytest.skip("paradetox.tsv not found")
    rows = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False).iloc[-500:]
    texts = list(rows["toxic"]) + list(rows["neutral1"])
    labels = np.r_[np.ones(len(rows)), np.zeros(len(rows))]
    auc = roc_auc_score(labels, load_toxicity_scorer("default").score(texts))
    assert auc >= 0.85, auc


def test_similarity_of_paraphrases_and_unrelated_text(embedder: SentenceEmbedder) -> None:
    """Paraphrases are close, unrelated sentences far, and a text embeds the same alone or padded in a batch."""
    sims = embedder.similarity(["A man is playing guitar.", "A man is playing guitar."],
                               ["A person plays a guitar.", "The stock market fell sharply on Tuesday."])
    assert sims[0] > 0.6 and sims[1] < 0.3, sims
    alone = embedder.embed(["A man is playing guitar."])
    batch = embedder.embed(["A man is playing guitar.", "A far longer sentence, which pads the short one in its "
                            "batch with many extra tokens, so that masking is really exercised here.", ""])
    np.testing.assert_allclose(batch[0], alone[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    with pytest.raises(InputError):
        embedder.similarity(["one"], ["one", "two"])
