"""Texts as vectors under a model: pooled hidden states per layer (base, adapter or intervention on or off) and
MiniLM sentence embeddings, cached on disk.

Texts are embedded by pooling one layer's hidden states over their real tokens (padding and the start token
masked), from the base model and from the same model with a CP adapter, and by MiniLM as a model-independent
reference. Embeddings are cached on disk per (model weights, adapter weights, layer, pooling, texts). Notebook 04
draws them with UMAP (cpwb.analysis.maps); the training-free peers (cpwb.engine.interventions) fit on them."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cpwb.core.errors import InputError
from cpwb.core.files import atomic_write_bytes, atomic_write_json
from cpwb.core.provenance import digest
from cpwb.engine.adapters import base_of
from cpwb.engine.device import eval_mode
from cpwb.engine.interventions import attached
from cpwb.engine.nll import decoder_and_head, decoder_layers, encode, length_buckets
from cpwb.engine.scoring import SentenceEmbedder

POOLINGS = ("mean", "last")


def texts_hash(texts: Sequence[str]) -> str:
    """SHA-256 of an ordered list of texts (part of every cache key)."""
    return digest(list(texts), 64)


def _cache_file(cache_dir: str | Path | None, key: dict[str, Any]) -> Path | None:
    """The cache file of one embedding matrix, named by the hash of everything it depends on (None: no cache)."""
    if not cache_dir:
        return None
    name = digest(key, 24)
    return Path(cache_dir) / f"{key['kind']}-{name}.npy"


def _load(path: Path | None, n_texts: int) -> np.ndarray | None:
    """A cached matrix with one row per text, or None when absent or unreadable (it is then recomputed)."""
    if path is None or not path.is_file():
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return array if array.ndim == 2 and array.shape[0] == n_texts else None


def _save(path: Path | None, array: np.ndarray, seconds: float | None = None) -> None:
    """Write a matrix into the cache atomically, with the seconds of the pass that computed it beside it."""
    if path is not None:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        if seconds is not None:
            atomic_write_json(path.with_suffix(".json"), {"seconds": seconds})
        atomic_write_bytes(path, buffer.getvalue())


def _seconds(path: Path | None) -> float | None:
    """The recorded seconds of the pass that computed a cached matrix (None: not recorded)."""
    try:
        return float(json.loads(path.with_suffix(".json").read_text())["seconds"])
    except (AttributeError, OSError, ValueError, KeyError, TypeError):
        return None


def model_fingerprint(model, use_adapter: bool = True) -> str:
    """Identity of the weights that embed: the base model's name (all its weights when unnamed) and the adapter's or
    intervention's."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = base.config.name_or_path
    hasher = hashlib.sha256(f"{name}|{base.dtype}".encode())
    tensors = {} if name else dict(base.state_dict())
    if use_adapter and hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        tensors |= {f"adapter.{k}": v for k, v in get_peft_model_state_dict(model).items()}
    intervention = attached(model) if use_adapter else None
    if intervention is not None:  # a ProFS edit or steering: its directions and strength
        hasher.update(f"{intervention.method}|{intervention.layers}|{intervention.strength}".encode())
        tensors |= {f"intervention.{k}": v for k, v in intervention.tensors.items()}
    for key in sorted(tensors):
        hasher.update(key.encode())
        hasher.update(tensors[key].detach().float().cpu().numpy().tobytes())
    return hasher.hexdigest()


def resolve_layers(model, layers: Sequence[int] | None) -> list[int]:
    """Layer indices as 0..L (0 = token embeddings, L = last layer, after the final norm); negatives count back."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n_layers = base.config.num_hidden_layers
    resolved = []
    for layer in range(n_layers + 1) if layers is None else layers:
        if not -(n_layers + 1) <= layer <= n_layers:
            raise InputError(f"layer {layer} out of range for a model with {n_layers} layers "
                             f"(0..{n_layers}, or -1 for the last)", field="layers")
        resolved.append(layer % (n_layers + 1))
    return list(dict.fromkeys(resolved))


def _check_texts(texts: Sequence[str]) -> list[str]:
    """The texts as a list of non-empty strings, naming the first bad one."""
    if isinstance(texts, str):
        raise InputError("expected a sequence of texts, got a single string", field="texts")
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"must be a non-empty string, got {text!r}", field=f"texts[{index}]")
    return texts


@torch.no_grad()
def hidden_states(model, tokenizer, texts: Sequence[str], layers: Sequence[int] | None = None, pooling: str = "mean",
                  batch_size: int = 16, max_length: int = 128, progress: bool = False,
                  before_final_norm: bool = False) -> dict[int, np.ndarray]:
    """Pooled hidden states {layer: (n_texts, hidden)} of `model` as it is (adapter on or off), uncached.

    `mean` averages over the text's own tokens, `last` takes its last token; padding and the start token that
    opens every text (`cpwb.engine.nll.encode`, as in scoring) never count, and position ids follow the attention mask,
    so a text's embedding does not depend on the batch it is in. Layer l > 0 is block l-1's output; the last is
    taken after the final norm unless `before_final_norm` (then every layer is a block output, the residual stream).
    """
    if pooling not in POOLINGS:
        raise InputError(f"must be one of {list(POOLINGS)}, got {pooling!r}", field="pooling")
    texts = _check_texts(texts)
    layers = resolve_layers(model, layers)
    decoder, _, _ = decoder_and_head(model)
    device = next(model.parameters()).device
    out = {layer: np.zeros((len(texts), decoder.config.hidden_size), dtype=np.float32) for layer in layers}
    with eval_mode(model):
        for idx in tqdm(length_buckets([len(t) for t in texts], batch_size), desc="hidden states",
                        disable=not progress):
            batch = encode(tokenizer, [texts[i] for i in idx], max_length=max_length).to(device)
            empty = (batch.target_mask.sum(-1) == 0).nonzero().flatten().tolist()
            if empty:
                raise InputError("has no tokens to embed", field=f"texts[{idx[empty[0]]}]")
            position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
            captured: list[torch.Tensor] = []
            hook = (decoder_layers(model)[-1].register_forward_hook(
                lambda _m, _i, output: captured.append(output[0] if isinstance(output, tuple) else output))
                if before_final_norm else None)
            try:
                states = list(decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      position_ids=position_ids, output_hidden_states=True,
                                      use_cache=False).hidden_states)
            finally:
                if hook is not None:
                    hook.remove()
            if captured:
                states[-1] = captured[0]
            mask = batch.target_mask.float()
            if pooling == "last":  # keep only the last text token of each row
                last = batch.target_mask.shape[1] - 1 - batch.target_mask.flip(-1).int().argmax(-1)
                mask = torch.zeros_like(mask).scatter_(1, last[:, None], 1.0)
            for layer in layers:
                pooled = (states[layer].float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                out[layer][idx] = pooled.cpu().numpy()
    return out


def model_embeddings(model, tokenizer, texts: Sequence[str], layers: Sequence[int] | None = None,
                     pooling: str = "mean", use_adapter: bool = True, cache_dir: str | Path | None = None,
                     batch_size: int = 16, max_length: int = 128, progress: bool = False,
                     before_final_norm: bool = False, costs: dict[int, float | None] | None = None
                     ) -> dict[int, np.ndarray]:
    """`hidden_states` with the adapter on or off (`use_adapter`, for peft models), cached per layer in `cache_dir`.

    All layers missing from the cache come from one forward pass; the cache key covers the model (its name, or its
    weights when it has none), the adapter's weights, the layer, pooling, max_length and the texts. `costs`, when
    given, receives per layer the seconds of the pass that computed it, now or when it was cached (None: unknown), so
    a fit from a warm cache can still report its full cost.
    """
    texts = _check_texts(texts)
    layers = resolve_layers(model, layers)
    identity = model_fingerprint(model, use_adapter)
    files = {layer: _cache_file(cache_dir, {"kind": "hidden", "model": identity,
                                            "layer": layer, "pooling": pooling, "max_length": max_length,
                                            "texts": texts_hash(texts),
                                            **({"before_final_norm": True} if before_final_norm else {})})
             for layer in layers}
    found = {layer: _load(files[layer], len(texts)) for layer in layers}
    missing = [layer for layer in layers if found[layer] is None]
    seconds = {layer: _seconds(files[layer]) for layer in layers if found[layer] is not None}
    if missing:
        started = time.perf_counter()
        with base_of(model) if not use_adapter else contextlib.nullcontext():
            computed = hidden_states(model, tokenizer, texts, missing, pooling, batch_size, max_length, progress,
                                     before_final_norm)
        elapsed = time.perf_counter() - started
        for layer, array in computed.items():
            _save(files[layer], array, elapsed)
            found[layer], seconds[layer] = array, elapsed
    if costs is not None:
        costs.update(seconds)
    return {layer: found[layer] for layer in layers}


def sentence_embeddings(embedder: SentenceEmbedder, texts: Sequence[str], cache_dir: str | Path | None = None,
                        batch_size: int = 64) -> np.ndarray:
    """MiniLM (or any SentenceEmbedder) vectors: the model-independent reference space, cached like the others."""
    texts = _check_texts(texts)
    path = _cache_file(cache_dir, {"kind": "sentence", "model": embedder.model.config.name_or_path,
                                   "max_length": embedder.max_length, "texts": texts_hash(texts)})
    array = _load(path, len(texts))
    if array is None:
        array = embedder.embed(texts, batch_size=batch_size)
        _save(path, array)
    return array
