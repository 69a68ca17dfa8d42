"""The training-free peers of CP, fitted on the same pairs, split and seed: ProFS and activation steering.

`cpwb train` with `objective: profs` or `objective: steering` comes here instead of the gradient loop: the base
model embeds each training pair's first non-toxic and first toxic text (cpwb.engine.interventions.text_embeddings),
the method's directions are computed per block, and the intervention is saved where a LoRA run saves its adapter
(`<output_dir>/adapter/`), so every evaluation protocol, sweep and tuning study loads it unchanged. The settings are
checked against the model's shape (read from its config, no weights) before anything is written.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from cpwb.core.config import require_same_settings, to_dict, yaml_text
from cpwb.core.errors import ConfigError
from cpwb.core.files import atomic_write_json, atomic_write_text
from cpwb.engine.device import peak_memory_mb, pick_device
from cpwb.engine.interventions import (
    Intervention,
    check_layers,
    is_intervention,
    load_intervention,
    profs_directions,
    steering_vectors,
    text_embeddings,
)
from cpwb.steps.training.batches import load_training_pairs
from cpwb.steps.training.config import NOT_FITTED, TrainConfig


def model_shape(config: TrainConfig) -> tuple[int, int]:
    """(blocks, hidden size) of the configured model, from its config alone."""
    from transformers import AutoConfig

    from cpwb.engine.assets import resolve_model

    shape = AutoConfig.from_pretrained(resolve_model(config.model), trust_remote_code=config.trust_remote_code)
    text = shape.get_text_config() if hasattr(shape, "get_text_config") else shape
    return int(text.num_hidden_layers), int(text.hidden_size)


def chosen_layers(config: TrainConfig, blocks: int, hidden: int) -> list[int]:
    """The blocks the method acts on, checked against the model (one line naming the setting if not)."""
    if config.objective == "profs":
        if config.edit_rank > hidden:
            raise ConfigError(f"{config.edit_rank} is larger than the hidden size ({hidden})", field="edit_rank")
        if config.edit_first_layer is not None:
            if config.edit_layers:
                raise ConfigError("give edit_layers or edit_first_layer, not both", field="edit_first_layer")
            check_layers([config.edit_first_layer], blocks, "edit_first_layer")
            return list(range(config.edit_first_layer, blocks))
        layers = list(config.edit_layers) or list(range(blocks // 2, blocks))
        check_layers(layers, blocks, "edit_layers")
        return layers
    layer = blocks // 2 if config.steering_layer is None else config.steering_layer
    check_layers([layer], blocks, "steering_layer")
    return [layer]


def fit_intervention(config: TrainConfig, resume: bool = False):
    """Fit ProFS or steering on the training pairs, save it as the run's adapter, return a TrainResult whose model
    is the base with the intervention attached. With `resume`, a saved intervention is loaded, not refitted."""
    from cpwb.engine.assets import cache_dir, load_causal_lm, load_tokenizer
    from cpwb.steps.training.trainer import TrainResult

    train_pairs, heldout, source = load_training_pairs(config)  # bad data fails before any weights load
    layers = chosen_layers(config, *model_shape(config))
    pairs = [r for r in train_pairs if r.positives and r.negatives]
    if not pairs:
        raise ConfigError("no training pair has both a non-toxic and a toxic text", field="pairs")
    run_dir, adapter_dir = Path(config.output_dir), Path(config.output_dir) / "adapter"
    device = pick_device(config.device)
    model = load_causal_lm(config.model, device=str(device), dtype=config.dtype,
                           trust_remote_code=config.trust_remote_code).eval()
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    metrics_path = run_dir / "metrics.jsonl"
    if resume and is_intervention(adapter_dir) and metrics_path.is_file():
        require_same_settings(run_dir / "config.yaml", to_dict(config), NOT_FITTED,
                              config_type=TrainConfig)
        history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        return TrainResult(run_dir, adapter_dir, history, heldout, load_intervention(adapter_dir).attach(model),
                           tokenizer)
    started = time.perf_counter()
    cache = cache_dir() / "embeddings" if config.embedding_cache else None
    costs: list[dict[int, float | None]] = [{}, {}]
    positive, negative = (text_embeddings(model, tokenizer, texts, layers, max_length=config.max_length,
                                          cache_dir=cache, progress=config.progress, costs=cost)
                          for texts, cost in zip(([r.positives[0].text for r in pairs],
                                                  [r.negatives[0].text for r in pairs]), costs, strict=True))
    embedded = time.perf_counter()
    if config.objective == "profs":
        lengths = None
        if config.edit_length_control:
            size = [(len(tokenizer(r.positives[0].text)["input_ids"]), len(tokenizer(r.negatives[0].text)["input_ids"]))
                    for r in pairs]
            lengths = torch.tensor([p - n for p, n in size], dtype=torch.float64)
        tensors = {layer: profs_directions(positive[layer], negative[layer], config.edit_rank, config.edit_centering,
                                           lengths) for layer in layers}
        settings = {"rank": config.edit_rank, "centering": config.edit_centering,
                    "length_control": config.edit_length_control}
    else:
        tensors = {layer: steering_vectors(positive[layer], negative[layer]) for layer in layers}
        settings = {}
    intervention = Intervention(config.objective, layers, tensors, config.steering_strength,
                                {**settings, "pairs": len(pairs), "model": config.model})
    seconds = time.perf_counter() - started
    passes = [list(cost.values()) for cost in costs]  # one forward pass per side gives every block
    embedding = None if any(None in side for side in passes) else sum(max(side) for side in passes)
    record = {"step": 1, "peak_memory_mb": peak_memory_mb(device), "pairs": len(pairs),
              "embedding_cache": config.embedding_cache, "embedding_seconds": embedding,
              # the full cost, from a warm cache too: the passes' recorded seconds and the rest of this fit
              "step_seconds": seconds if embedding is None else time.perf_counter() - embedded + embedding}
    atomic_write_text(run_dir / "config.yaml", yaml_text(to_dict(config)))
    atomic_write_json(run_dir / "data.json", {**source, "processes": 1})
    intervention.save(adapter_dir)
    atomic_write_text(metrics_path, json.dumps(record, sort_keys=True) + "\n")  # last: marks the fit done
    return TrainResult(run_dir, adapter_dir, [record], heldout, intervention.attach(model), tokenizer)
