"""Toxicity scorers beyond the BiLSTMs, through the real loaders and offline: a locally built
AutoModelForSequenceClassification folder, and a locally built Detoxify checkpoint loaded through the `detoxify`
package. Tiny random-init BERTs (plumbing, not accuracy); their scores are checked against the models' own logits."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from cpwb.core.errors import AssetError, ConfigError, InputError
from cpwb.engine.classifiers import DetoxifyScorer, HFClassifierScorer
from cpwb.engine.scoring import ToxicityScorer, load_toxicity_scorer
from cpwb.steps.evaluation.config import EvaluateConfig

WORDS = "you are a an idiot nice person hello world stupid kind the is".split()
TEXTS = ["you are an idiot", "hello world", "", "the kind person is nice " * 40]
JIGSAW = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


def _tiny_bert(folder: Path, labels: list[str], problem_type: str | None = None) -> BertForSequenceClassification:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), model_max_length=64).save_pretrained(folder)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={k: i for i, k in enumerate(labels)},
                        problem_type=problem_type)
    torch.manual_seed(0)
    return BertForSequenceClassification(config).eval()


def _logits(model, folder: Path, texts: list[str]) -> torch.Tensor:
    inputs = BertTokenizer.from_pretrained(folder)(texts, return_tensors="pt", padding=True, truncation=True,
                                                   max_length=64)
    with torch.inference_mode():
        return model(**inputs).logits.double()


@pytest.fixture
def classifier(tmp_path) -> tuple[Path, BertForSequenceClassification]:
    model = _tiny_bert(tmp_path / "clf", ["neutral", "toxic"])
    model.save_pretrained(tmp_path / "clf")
    return tmp_path / "clf", model


def test_any_local_classifier_folder_scores_the_named_label_with_softmax(classifier):
    folder, model = classifier
    scorer = load_toxicity_scorer(f"hf:{folder}", label="TOXIC", max_length=64)  # the label's case is ignored
    assert isinstance(scorer, ToxicityScorer) and scorer.label == "toxic" and scorer.labels == ("neutral", "toxic")
    expected = torch.softmax(_logits(model, folder, TEXTS), dim=-1)[:, 1].numpy()
    np.testing.assert_allclose(scorer.score(TEXTS, batch_size=3), expected, rtol=1e-6, atol=1e-7)
    table = scorer.scores_by_label(TEXTS)
    np.testing.assert_allclose(table.sum(axis=1), 1.0, rtol=1e-9)


def test_a_multi_label_classifier_gets_a_sigmoid_per_label(tmp_path):
    model = _tiny_bert(tmp_path / "ml", JIGSAW, "multi_label_classification")
    model.save_pretrained(tmp_path / "ml")
    scorer = HFClassifierScorer(tmp_path / "ml", label="insult", max_length=64)
    expected = torch.sigmoid(_logits(model, tmp_path / "ml", TEXTS))[:, 4].numpy()
    np.testing.assert_allclose(scorer.score(TEXTS), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.bad_input(3)
def test_a_classifier_without_the_toxic_label_or_folder_or_with_an_unknown_option_is_refused(classifier):
    folder, _ = classifier
    with pytest.raises(InputError, match=r"no label 'hate' .*labels: neutral, toxic") as error:
        load_toxicity_scorer(f"hf:{folder}", label="hate")
    assert len(str(error.value).splitlines()) == 1 and error.value.field == "label"
    with pytest.raises(AssetError, match="not found"):
        load_toxicity_scorer(f"hf:{folder}-missing")
    with pytest.raises(InputError, match="scorer_options"):
        load_toxicity_scorer(f"hf:{folder}", colour="red")


def _detoxify_checkpoint(tmp_path: Path, **changes) -> tuple[Path, Path, BertForSequenceClassification]:
    model = _tiny_bert(tmp_path / "bert-config", JIGSAW)
    model.config.save_pretrained(tmp_path / "bert-config")  # the base model's config and tokenizer: no weights
    content = {"config": {"arch": {"args": {"model_type": "bert-base-uncased",
                                            "model_name": "BertForSequenceClassification",
                                            "tokenizer_name": "BertTokenizer", "num_classes": 6}},
                          "dataset": {"args": {"classes": JIGSAW}}},
               "state_dict": model.state_dict(), **changes}
    torch.save(content, tmp_path / "toxic_tiny.ckpt")
    return tmp_path / "toxic_tiny.ckpt", tmp_path / "bert-config", model


def test_a_local_detoxify_checkpoint_loads_offline_through_the_detoxify_package(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # bert-base-uncased is never looked up
    checkpoint, config, model = _detoxify_checkpoint(tmp_path)
    scorer = load_toxicity_scorer("detoxify", checkpoint=checkpoint, huggingface_config_path=config)
    assert isinstance(scorer._model, __import__("detoxify").Detoxify)  # predictions are detoxify's own
    assert scorer.labels == ("toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack")
    inputs = BertTokenizer.from_pretrained(config)(TEXTS, return_tensors="pt", padding=True, truncation=True)
    with torch.inference_mode():
        expected = torch.sigmoid(model(**inputs).logits.double())[:, 0].numpy()
    np.testing.assert_allclose(scorer.score(TEXTS, batch_size=4), expected, rtol=1e-5, atol=1e-6)
    one = scorer.score(TEXTS[:1])  # one text: detoxify squeezes it to a number
    assert one.shape == (1,)


@pytest.mark.bad_input(4)
def test_a_detoxify_checkpoint_of_the_wrong_format_is_refused_in_one_line(tmp_path):
    checkpoint, config, _ = _detoxify_checkpoint(tmp_path)
    content = torch.load(checkpoint, weights_only=True)
    del content["config"]["dataset"]
    torch.save(content, tmp_path / "no-classes.ckpt")
    with pytest.raises(InputError, match="not a Detoxify checkpoint") as error:
        DetoxifyScorer(checkpoint=tmp_path / "no-classes.ckpt", huggingface_config_path=config)
    assert error.value.field == "config.dataset"
    torch.save({**content, "config": {**content["config"], "dataset": {"args": {"classes": JIGSAW}}},
                "extra": np.dtype("float64").type}, tmp_path / "pickled.ckpt")  # an object beyond plain data
    with pytest.raises(InputError, match="weights_only=True"):
        DetoxifyScorer(checkpoint=tmp_path / "pickled.ckpt", huggingface_config_path=config)
    partial = {**content, "config": {**content["config"], "dataset": {"args": {"classes": JIGSAW}}},
               "state_dict": {k: v for k, v in content["state_dict"].items() if "classifier" not in k}}
    torch.save(partial, tmp_path / "partial.ckpt")
    with pytest.raises(InputError, match="lacks 2 weight"):
        DetoxifyScorer(checkpoint=tmp_path / "partial.ckpt", huggingface_config_path=config)
    with pytest.raises(AssetError, match="huggingface_config_path"):
        DetoxifyScorer(checkpoint=checkpoint)


@pytest.mark.bad_input(1)
def test_an_unknown_scorer_name_is_refused_by_the_config_before_anything_loads():
    with pytest.raises(ConfigError, match="unknown toxicity scorer 'perspective'") as error:
        EvaluateConfig(scorer="perspective")
    assert error.value.field == "scorer"
    EvaluateConfig(scorer="hf:/any/folder", scorer_options={"label": "LABEL_1"})  # checked when it loads
