"""Toxicity scorers beyond the embedded BiLSTMs: any local sequence-classification model, and Detoxify checkpoints.

`HFClassifierScorer` takes a folder any `AutoModelForSequenceClassification` loads (ToxiGen-RoBERTa, HateBERT,
unitary/toxic-bert, s-nlp/roberta_toxicity_classifier, one's own), with the label that means toxic named and checked
against `config.id2label`. `DetoxifyScorer` loads a Detoxify checkpoint offline through the `detoxify` package.

Why not `Detoxify(checkpoint=..., huggingface_config_path=...)` as its README says: detoxify 0.5.4 reads the
checkpoint with `torch.load(weights_only=False)` (it unpickles whatever the file holds) and looks the base model's
config up on the hub by name even when given a local folder, so the documented offline route fails without a
network. Here the checkpoint is read with `weights_only=True` (tensors and plain data only), its format checked,
and the model and tokenizer built by detoxify's own `get_model_and_tokenizer` from the local folder; predictions
are detoxify's (`Detoxify.predict`: sigmoid per class, its class names).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cpwb.core.errors import AssetError, InputError
from cpwb.engine.assets import refuse_remote_code

# detoxify's own renaming of the Jigsaw classes (detoxify.detoxify.load_checkpoint)
DETOXIFY_NAMES = {"toxic": "toxicity", "identity_hate": "identity_attack", "severe_toxic": "severe_toxicity"}


def _online() -> bool:
    return os.environ.get("CPWB_ONLINE") == "1"


def _batched_probabilities(texts: list[str], batch_size: int, progress: bool, desc: str, predict) -> np.ndarray:
    """`predict(batch) -> (len(batch), n_labels)` over `texts` in batches, stacked."""
    from cpwb.engine.scoring import _batches

    parts = [np.asarray(predict(batch), dtype=np.float64) for _, batch in _batches(texts, batch_size, progress, desc)]
    return np.concatenate(parts) if parts else np.zeros((0, 0))


class HFClassifierScorer:
    """Toxicity from any local `AutoModelForSequenceClassification` folder (or a hub id with CPWB_ONLINE=1).

    `label` names the output that means toxic, as the folder's `config.id2label` spells it (case ignored); a
    folder without it is refused, listing the labels it has. Probabilities: softmax over the labels for a
    single-label classifier, sigmoid per label for `problem_type: multi_label_classification` or one output.
    """

    def __init__(self, path: str | Path, label: str = "toxic", max_length: int = 512, device: str = "cpu",
                 trust_remote_code: bool = False) -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        path = str(path)
        if not Path(path).is_dir() and not _online():
            raise AssetError(f"classifier folder not found: {path} (a hub id needs CPWB_ONLINE=1)")
        refuse_remote_code(path, trust_remote_code)
        local = not _online()
        config = AutoConfig.from_pretrained(path, local_files_only=local, trust_remote_code=trust_remote_code)
        names = [str(config.id2label[i]) for i in range(config.num_labels)]
        matches = [i for i, name in enumerate(names) if name.lower() == str(label).lower()]
        if not matches:
            raise InputError(f"no label {label!r} in config.id2label of {path} (labels: {', '.join(names)}); name the "
                             "one that means toxic", field="label")
        self.labels, self.label, self._index = tuple(names), names[matches[0]], matches[0]
        self._sigmoid = config.problem_type == "multi_label_classification" or config.num_labels == 1
        self.name = f"hf:{Path(path).name}"
        self.max_length, self.device = max_length, device
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local,
                                                        trust_remote_code=trust_remote_code)
        self._model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=local, trust_remote_code=trust_remote_code).to(device).eval()

    def _predict(self, batch: list[str]) -> np.ndarray:
        inputs = self._tokenizer(batch, return_tensors="pt", truncation=True, padding=True,
                                 max_length=self.max_length).to(self.device)
        with torch.inference_mode():
            logits = self._model(**inputs).logits.double()
        return (torch.sigmoid(logits) if self._sigmoid else torch.softmax(logits, dim=-1)).cpu().numpy()

    def scores_by_label(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> pd.DataFrame:
        """Every output's probability, one row per text."""
        from cpwb.engine.scoring import _check_texts

        out = _batched_probabilities(_check_texts(texts), batch_size, progress, self.name, self._predict)
        return pd.DataFrame(out.reshape(-1, len(self.labels)), columns=list(self.labels))

    def score(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Probability of the toxic label for each text."""
        return self.scores_by_label(texts, batch_size, progress)[self.label].to_numpy()


def read_detoxify_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Detoxify checkpoint's content, read with `weights_only=True`, its format checked (one line per problem)."""
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"Detoxify checkpoint not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled objects beyond tensors and plain data, or not a torch file at all
        reason = " ".join(str(err).split())[:200]
        raise InputError(f"not a plain Detoxify checkpoint (read with weights_only=True): {reason}", path) from None
    fields = (("config", "arch", "args", "model_name"), ("config", "arch", "args", "tokenizer_name"),
              ("config", "arch", "args", "num_classes"), ("config", "dataset", "args", "classes"), ("state_dict",))
    for keys in fields:
        node: Any = loaded
        for depth, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                raise InputError("not a Detoxify checkpoint: missing", path, field=".".join(keys[:depth + 1]))
            node = node[key]
    return loaded


class DetoxifyScorer:
    """A Detoxify model loaded offline through the `detoxify` package (see the module docstring for why not its
    own loader). `checkpoint`: the `.ckpt` file; `huggingface_config_path`: a local folder with the transformers
    config and tokenizer of the checkpoint's base model (bert-base-uncased for "original", roberta-base for
    "unbiased"). Without a checkpoint, and only with CPWB_ONLINE=1, the released one of `model_type` is
    downloaded, read with weights_only=True too. Score: the "toxicity" output."""

    def __init__(self, model_type: str = "original", checkpoint: str | Path | None = None,
                 huggingface_config_path: str | Path | None = None, device: str = "cpu",
                 label: str = "toxicity") -> None:
        try:
            from detoxify import Detoxify
            from detoxify.detoxify import MODEL_URLS, get_model_and_tokenizer
        except ImportError as error:
            raise AssetError("DetoxifyScorer needs the optional package detoxify: `pip install detoxify`") from error
        if checkpoint is not None:
            loaded = read_detoxify_checkpoint(checkpoint)
        elif _online():
            loaded = torch.hub.load_state_dict_from_url(MODEL_URLS[model_type], map_location="cpu", weights_only=True)
        else:
            raise AssetError("DetoxifyScorer offline needs checkpoint= (a .ckpt file) and huggingface_config_path= "
                             "(the base model's config and tokenizer folder); CPWB_ONLINE=1 downloads them")
        if huggingface_config_path is None and not _online():
            raise AssetError("DetoxifyScorer offline needs huggingface_config_path= (a folder with the config and "
                             "tokenizer of the checkpoint's base model)")
        args = dict(loaded["config"]["arch"]["args"])
        if huggingface_config_path is not None:
            config_path = Path(huggingface_config_path)
            if not (config_path / "config.json").is_file():
                raise AssetError(f"no config.json in huggingface_config_path {config_path}")
            args["model_type"] = str(config_path)  # detoxify reads the config by this name, from the hub otherwise
        model, tokenizer = get_model_and_tokenizer(**args, state_dict=loaded["state_dict"],
                                                   huggingface_config_path=None if huggingface_config_path is None
                                                   else str(huggingface_config_path))
        missing = [k for k in model.state_dict() if k not in loaded["state_dict"] and not k.endswith("position_ids")]
        if missing:
            raise InputError(f"the checkpoint's state_dict lacks {len(missing)} weight(s) of "
                             f"{args.get('model_name')}, e.g. {missing[0]}", checkpoint, field="state_dict")
        self._model = Detoxify.__new__(Detoxify)  # its predict(), on the model built above
        self._model.model, self._model.tokenizer, self._model.device = model.to(device), tokenizer, device
        self._model.class_names = [DETOXIFY_NAMES.get(c, c) for c in loaded["config"]["dataset"]["args"]["classes"]]
        self.name, self.label = f"detoxify-{model_type}", label
        self.labels = tuple(self._model.class_names)
        if label not in self.labels:
            raise InputError(f"unknown label {label!r}; labels: {', '.join(self.labels)}", field="label")

    def _predict(self, batch: list[str]) -> np.ndarray:
        predicted = self._model.predict(batch)
        return np.column_stack([np.atleast_1d(predicted[label]) for label in self.labels])

    def scores_by_label(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> pd.DataFrame:
        """Every Detoxify output, one row per text."""
        from cpwb.engine.scoring import _check_texts

        out = _batched_probabilities(_check_texts(texts), batch_size, progress, self.name, self._predict)
        return pd.DataFrame(out.reshape(-1, len(self.labels)), columns=list(self.labels))

    def score(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Probability of `self.label` ("toxicity" by default) for each text."""
        return self.scores_by_label(texts, batch_size, progress)[self.label].to_numpy()
