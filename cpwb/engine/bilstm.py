"""Jigsaw-trained BiLSTM toxicity classifiers (tox-block, toxic-comment-classifier) re-implemented in PyTorch.

Both PyPI packages ship the same Keras architecture: Embedding(20000, 50) -> Bidirectional LSTM(50, return
sequences) -> GlobalMaxPool1D -> Dense(50, relu) -> Dense(6, sigmoid), fed by a Keras `Tokenizer` and
`pad_sequences(maxlen=100)`. Their weights are read from the h5 files with h5py and their tokenizers from the
pickles with a restricted unpickler, once, into a checksummed cache (`model.safetensors`, `vocab.json`,
`config.json`); later loads read only those files. TensorFlow is never needed or imported.

Faithfulness notes: Keras ran without masking (the Embedding has `mask_zero=False`), so the pre-padding zeros are
real inputs to both directions, and the backward direction reads the whole padded sequence reversed. tox-block's
LSTM uses Keras 2's `hard_sigmoid` (clip(0.2 x + 0.5, 0, 1)) as recurrent activation; toxic-comment-classifier
uses the Keras 3 default, the logistic sigmoid. Outputs are the raw sigmoids: tox-block's optional RESCALE_PROBA
min-max stretch is not applied (it leaves rankings, hence ROC AUC, unchanged).
"""
from __future__ import annotations

import collections
import contextlib
import json
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import h5py
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cpwb.core.errors import AssetError
from cpwb.engine.assets import cached_conversion, package_dir

LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
CACHE_FORMAT = 1  # bump when `convert` writes something different: the cache folder name carries it
MAXLEN = 100  # pad_sequences length of both packages (tox-block MAX_SEQUENCE_LENGTH, toxic_classifier MAXLEN)

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "hard_sigmoid": lambda x: torch.clamp(0.2 * x + 0.5, 0.0, 1.0),  # Keras 2 definition, not Keras 3's x/6+1/2
}


@dataclass(frozen=True)
class BiLSTMSource:
    """Where one packaged BiLSTM lives and what its files do not say about themselves."""

    package: str
    weights: str
    tokenizer: str
    recurrent_activation: str  # used only for weights-only files; full-model h5 files carry their config


SOURCES = {
    "bilstm-toxblock": BiLSTMSource(
        "tox_block", "trained_models/lstm_model_0.1.2.h5", "trained_models/encoder_0.1.2.pkl", "hard_sigmoid"),
    "bilstm-tcc": BiLSTMSource("toxic_classifier", "model/model.weights.h5", "model/tokenizer.pickle", "sigmoid"),
}


# ---------------------------------------------------------------------------------------------- tokenizer pickles

class _TokenizerState:
    """Stand-in for the pickled Keras `Tokenizer` classes: receives their attribute dict and nothing else."""


class _TokenSequencerState:
    """Stand-in for tox-block's pickled `TokenSequencer` (a scikit-learn transformer wrapping a Tokenizer)."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only a whitelist of harmless globals, so a tokenizer pickle cannot run code."""

    ALLOWED: ClassVar[Mapping[tuple[str, str], Any]] = MappingProxyType({
        ("keras_preprocessing.text", "Tokenizer"): _TokenizerState,
        ("keras.preprocessing.text", "Tokenizer"): _TokenizerState,
        ("keras.src.preprocessing.text", "Tokenizer"): _TokenizerState,
        ("keras.src.legacy.preprocessing.text", "Tokenizer"): _TokenizerState,
        ("tox_block.data_processing.preprocessors", "TokenSequencer"): _TokenSequencerState,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("builtins", "int"): int,  # the default factory of the word_docs/index_docs defaultdicts
    })

    def find_class(self, module: str, name: str) -> Any:
        """Map a whitelisted global to our stand-in; refuse everything else."""
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise AssetError(f"refusing to unpickle {module}.{name}: not a tokenizer class we know") from None


def read_tokenizer_pickle(path: Path) -> dict[str, Any]:
    """The Keras Tokenizer attributes stored in a tokenizer pickle (or in tox-block's TokenSequencer)."""
    try:
        with open(path, "rb") as handle:
            obj = RestrictedUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, AssetError) as error:
        raise AssetError(f"{path}: {error}") from error
    if isinstance(obj, _TokenSequencerState):
        obj = getattr(obj, "tokenizer", None)
    if not isinstance(obj, _TokenizerState):
        raise AssetError(f"{path}: no Keras Tokenizer inside (found {type(obj).__name__})")
    return vars(obj)


# ---------------------------------------------------------------------------------------------- our tokenizer

@dataclass(frozen=True)
class KerasTokenizer:
    """Keras `texts_to_sequences` + `pad_sequences(padding='pre', truncating='pre')`, from a JSON vocabulary."""

    word_index: dict[str, int]
    num_words: int
    filters: str
    lower: bool
    split: str
    oov_index: int | None
    maxlen: int

    @classmethod
    def from_state(cls, state: dict[str, Any], maxlen: int) -> KerasTokenizer:
        """Keep only what Keras used at prediction time: words with index < num_words."""
        if state.get("char_level") or state.get("analyzer") is not None:
            raise AssetError("character-level or custom-analyzer Keras tokenizers are not supported")
        num_words = int(state["num_words"] or 1 << 62)
        oov = state.get("oov_token")
        return cls({w: int(i) for w, i in state["word_index"].items() if int(i) < num_words}, num_words,
                   str(state["filters"]), bool(state["lower"]), str(state["split"]),
                   None if oov is None else int(state["word_index"][oov]), maxlen)

    @classmethod
    def load(cls, path: Path) -> KerasTokenizer:
        """Read the vocabulary written by `save`."""
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    def save(self, path: Path) -> None:
        """Write the vocabulary as plain JSON (no pickle at load time)."""
        path.write_text(json.dumps(vars(self), ensure_ascii=False), encoding="utf-8")

    def sequence(self, text: str) -> list[int]:
        """Word indices of one text, as Keras `texts_to_sequences` computes them."""
        if self.lower:
            text = text.lower()
        text = text.translate(str.maketrans({c: self.split for c in self.filters}))
        ids = []
        for word in (w for w in text.split(self.split) if w):
            index = self.word_index.get(word)
            if index is not None:
                ids.append(index)
            elif self.oov_index is not None:
                ids.append(self.oov_index)
        return ids

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Pre-padded, pre-truncated int64 matrix (len(texts), maxlen); an empty text is all padding (0)."""
        out = np.zeros((len(texts), self.maxlen), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.sequence(text)[-self.maxlen:]
            if ids:
                out[row, -len(ids):] = ids
        return out


# ---------------------------------------------------------------------------------------------- the model

@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Use one torch thread meanwhile: tiny LSTM steps gain nothing from more, lost 30x to thread sync on busy CPUs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class BiLSTMClassifier(nn.Module):
    """Embedding -> BiLSTM (Keras semantics, no masking) -> global max pool -> Dense relu -> Dense sigmoid.

    LSTM weights keep the Keras layout: `kernel` (2, embed, 4*units), `recurrent` (2, units, 4*units) and one
    `bias` (2, 4*units), gates ordered (input, forget, cell, output), index 0 forward and 1 backward.
    """

    def __init__(self, vocab_size: int = 20000, embed_dim: int = 50, units: int = 50, hidden: int = 50,
                 n_labels: int = len(LABELS), recurrent_activation: str = "sigmoid") -> None:
        super().__init__()
        if recurrent_activation not in _ACTIVATIONS:
            raise AssetError(f"unsupported recurrent activation {recurrent_activation!r}")
        self.recurrent_activation = recurrent_activation
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.kernel = nn.Parameter(torch.zeros(2, embed_dim, 4 * units))
        self.recurrent = nn.Parameter(torch.zeros(2, units, 4 * units))
        self.bias = nn.Parameter(torch.zeros(2, 4 * units))
        self.dense = nn.Linear(2 * units, hidden)
        self.out = nn.Linear(hidden, n_labels)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Label probabilities (batch, n_labels) for padded id matrices (batch, time)."""
        with _one_thread():
            return self._forward(ids)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The computation of `forward`."""
        act = _ACTIVATIONS[self.recurrent_activation]
        x = self.embedding(ids)
        both = torch.stack([x, x.flip(1)])  # the backward LSTM reads the padded sequence reversed
        inputs = torch.matmul(both, self.kernel.unsqueeze(1)) + self.bias[:, None, None, :]
        units = self.recurrent.shape[1]
        h = x.new_zeros(2, x.shape[0], units)
        c = torch.zeros_like(h)
        pooled = torch.full_like(h, float("-inf"))
        for step in range(ids.shape[1]):
            z = inputs[:, :, step] + torch.bmm(h, self.recurrent)
            i, f, g, o = z.split(units, dim=-1)
            c = act(f) * c + act(i) * torch.tanh(g)
            h = act(o) * torch.tanh(c)
            pooled = torch.maximum(pooled, h)
        features = torch.cat([pooled[0], pooled[1]], dim=-1)  # Keras Bidirectional concat: forward first
        return torch.sigmoid(self.out(torch.relu(self.dense(features))))


# ---------------------------------------------------------------------------------------------- h5 readers

def _keras2_full_model(f: h5py.File) -> tuple[dict[str, Any], str]:
    """Weights and recurrent activation of a Keras 2 `model.save(...h5)` file, after checking the architecture."""
    layers = [layer for layer in json.loads(f.attrs["model_config"])["config"]["layers"]
              if layer["class_name"] not in ("InputLayer", "Dropout")]
    kinds = [layer["class_name"] for layer in layers]
    if kinds != ["Embedding", "Bidirectional", "GlobalMaxPooling1D", "Dense", "Dense"]:
        raise AssetError(f"unexpected Keras architecture {kinds}")
    embedding, bidirectional, _, dense, out = (layer["config"] for layer in layers)
    lstm = bidirectional["layer"]["config"]
    if embedding.get("mask_zero") or bidirectional.get("merge_mode") != "concat" or lstm.get("go_backwards") \
            or lstm["activation"] != "tanh" or not lstm["use_bias"] or not lstm["return_sequences"]:
        raise AssetError("Keras model differs from the supported BiLSTM (mask, merge mode, activation or bias)")
    group = f["model_weights"]

    def weights(layer: dict[str, Any]) -> tuple[np.ndarray, ...]:
        block = group[layer["name"]]
        return tuple(block[n.decode() if isinstance(n, bytes) else n][()] for n in block.attrs["weight_names"])

    forward_and_backward = weights(bidirectional)  # kernel, recurrent kernel, bias of each direction
    arrays = {"embedding": weights(embedding)[0], "fw": forward_and_backward[:3], "bw": forward_and_backward[3:],
              "dense": weights(dense), "out": weights(out)}
    return arrays, lstm["recurrent_activation"]


def _keras3_weights(f: h5py.File) -> dict[str, Any]:
    """Weights of a Keras 3 `save_weights(...weights.h5)` file (layer names as in toxic_classifier/model.py)."""
    layers = f["layers"]

    def var(path: str) -> tuple[np.ndarray, ...]:
        block = layers[path]["vars"]
        return tuple(block[str(k)][()] for k in range(len(block)))

    return {"embedding": var("embedding")[0], "fw": var("bidirectional/forward_layer/cell"),
            "bw": var("bidirectional/backward_layer/cell"), "dense": var("dense"), "out": var("dense_1")}


def read_keras_h5(path: Path, recurrent_activation: str) -> BiLSTMClassifier:
    """Build our module from either h5 layout; `recurrent_activation` applies only to weights-only files."""
    with h5py.File(path, "r") as f:
        if "model_weights" in f:
            arrays, recurrent_activation = _keras2_full_model(f)
        elif "layers" in f:
            arrays = _keras3_weights(f)
        else:
            raise AssetError(f"{path}: neither a Keras 2 model file nor a Keras 3 weights file")
    emb = arrays["embedding"]
    units = arrays["fw"][1].shape[0]
    model = BiLSTMClassifier(emb.shape[0], emb.shape[1], units, arrays["dense"][0].shape[1],
                             arrays["out"][0].shape[1], recurrent_activation)
    state = {
        "embedding.weight": emb,
        "kernel": np.stack([arrays["fw"][0], arrays["bw"][0]]),
        "recurrent": np.stack([arrays["fw"][1], arrays["bw"][1]]),
        "bias": np.stack([arrays["fw"][2], arrays["bw"][2]]),
        "dense.weight": arrays["dense"][0].T, "dense.bias": arrays["dense"][1],
        "out.weight": arrays["out"][0].T, "out.bias": arrays["out"][1],
    }
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()})
    return model.eval()


# ---------------------------------------------------------------------------------------------- conversion + load

def convert(source: BiLSTMSource, folder: Path, root: Path) -> None:
    """Write `model.safetensors`, `vocab.json` and `config.json` for one packaged BiLSTM into `folder`."""
    model = read_keras_h5(root / source.weights, source.recurrent_activation)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    tokenizer = KerasTokenizer.from_state(read_tokenizer_pickle(root / source.tokenizer), MAXLEN)
    tokenizer.save(folder / "vocab.json")
    config = {"vocab_size": model.embedding.num_embeddings, "embed_dim": model.embedding.embedding_dim,
              "units": model.recurrent.shape[1], "hidden": model.dense.out_features,
              "n_labels": model.out.out_features, "recurrent_activation": model.recurrent_activation,
              "labels": list(LABELS), "package": source.package}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def converted_dir(name: str) -> Path:
    """The cache folder of a packaged BiLSTM, converting it on first use (or when the cache fails its checksums)."""
    if name not in SOURCES:
        raise AssetError(f"unknown BiLSTM {name!r}; available: {', '.join(SOURCES)}")
    source = SOURCES[name]
    root = package_dir(source.package)
    return cached_conversion(f"{name}.v{CACHE_FORMAT}", root / source.weights, partial(convert, source, root=root))


def load_bilstm(name: str) -> tuple[BiLSTMClassifier, KerasTokenizer, dict[str, Any]]:
    """Model (eval mode), tokenizer and config of a packaged BiLSTM, read from the safetensors cache."""
    folder = converted_dir(name)
    config = json.loads((folder / "config.json").read_text())
    model = BiLSTMClassifier(config["vocab_size"], config["embed_dim"], config["units"], config["hidden"],
                             config["n_labels"], config["recurrent_activation"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval(), KerasTokenizer.load(folder / "vocab.json"), config
