"""The CP trainer: LoRA (or 4-bit QLoRA) on any causal LM, resumable, with per-step metrics.

Each optimizer step takes `anchors_per_step` anchors (x `grad_accum`), scores all their positives and negatives
with the NLL engine in one length-sorted batch, and applies the configured objective from cpwb.engine.loss. Checkpoints
(adapter, optimizer, scheduler, RNG, step) are written atomically every `checkpoint_every` steps; `resume=True`
continues from the last one to the same final adapter as an uninterrupted run. Data-parallel runs go through
`accelerate launch -m cpwb train --config ...`: each process takes its share of the anchors and the LoRA gradients
are averaged across processes."""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cpwb.core.config import require_same_settings, to_dict, yaml_text
from cpwb.core.errors import CpwbError
from cpwb.core.files import append_jsonl, atomic_path, atomic_write_json, atomic_write_text, read_jsonl_tolerant
from cpwb.data.corpora import general_texts
from cpwb.data.pairs import PairRecord
from cpwb.engine.device import peak_memory_mb, pick_device
from cpwb.steps.training.batches import anchor_order, build_anchor_batch, load_training_pairs
from cpwb.steps.training.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from cpwb.steps.training.config import TrainConfig
from cpwb.steps.training.model import build_model, check_target_modules, make_optimizer, use_packing
from cpwb.steps.training.objective import objective_loss


class NonFiniteLossError(CpwbError):
    """Training produced a NaN or infinite loss or gradient; the last good checkpoint is kept."""


def _stop_if_non_finite(what: str, value: torch.Tensor, step: int, run_dir: Path) -> None:
    """Raise NonFiniteLossError naming the step and the last good checkpoint unless `value` is finite."""
    if not torch.isfinite(value):
        raise NonFiniteLossError(f"non-finite {what} {value.item()} at step {step}; last good checkpoint: "
                                 f"{latest_checkpoint(run_dir) or 'none yet'} (lower lr or tau, or check the data)")


@dataclass
class TrainResult:
    """Where a finished run put its adapter and metrics."""

    run_dir: Path
    adapter_dir: Path
    metrics: list[dict[str, Any]]
    heldout: list[PairRecord]
    model: Any  # the trained peft model, still in memory
    tokenizer: Any


def _average_gradients_across_processes(model) -> None:
    """Mean of the LoRA gradients over data-parallel processes (no-op in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


def train(config: TrainConfig, resume: bool = False, stop_after: int | None = None) -> TrainResult:
    """Train a LoRA adapter with the configured objective; `stop_after` ends early (to test resuming)."""
    train_pairs, heldout, source = load_training_pairs(config)  # bad data fails before any weights load
    check_target_modules(config)
    device = pick_device(config.device)
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) \
        if torch.distributed.is_available() and torch.distributed.is_initialized() else (0, 1)
    total_steps = config.steps or math.ceil(len(train_pairs) / (config.anchors_per_step * config.grad_accum * world))
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_model(config, device)
    optimizer, scheduler = make_optimizer(model, config, total_steps)
    packed = config.packing and use_packing(model, tokenizer, train_pairs, config, device)
    general = general_texts() if config.kl_weight > 0 and config.kl_data == "general" else None
    rng = random.Random(config.seed)
    start = 0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        require_same_settings(run_dir / "config.yaml", to_dict(config))
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, model, optimizer, scheduler, rng)
    metrics_path = run_dir / "metrics.jsonl"
    kept = [m for m in read_jsonl_tolerant(metrics_path) if m["step"] <= start] if start else []
    atomic_write_text(metrics_path, "".join(json.dumps(m, sort_keys=True) + "\n" for m in kept))
    if rank == 0:
        atomic_write_text(run_dir / "config.yaml", yaml_text(to_dict(config)))
        atomic_write_json(run_dir / "data.json", source)
    per_step = config.anchors_per_step * config.grad_accum * world
    model.train()
    history = kept
    for step in tqdm(range(start + 1, total_steps + 1), desc="CP training", initial=start, total=total_steps,
                     disable=not config.progress or rank != 0):
        started = time.perf_counter()
        order = anchor_order(len(train_pairs), config.seed, per_step, offset=(step - 1) * per_step)
        mine = order[rank::world]
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        n_tokens = 0
        for micro in range(config.grad_accum):
            batch = build_anchor_batch(train_pairs, mine[micro::config.grad_accum], config, rng, general)
            value, metrics, tokens = objective_loss(model, tokenizer, batch, config, device, packed)
            _stop_if_non_finite("loss", value, step, run_dir)
            (value / config.grad_accum).backward()
            n_tokens += tokens
            for key, number in {"loss": value.item(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + number / config.grad_accum
        _average_gradients_across_processes(model)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   config.max_grad_norm)
        _stop_if_non_finite("gradient norm", grad_norm, step, run_dir)  # before NaN reaches weights or a checkpoint
        optimizer.step()
        scheduler.step()
        seconds = time.perf_counter() - started
        record = {"step": step, **totals, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                  "tokens_per_s": n_tokens / seconds, "step_seconds": seconds,
                  "peak_memory_mb": peak_memory_mb(device)}
        history.append(record)
        if rank == 0:
            append_jsonl(metrics_path, record)
            if step % config.checkpoint_every == 0 or step == total_steps:
                save_checkpoint(run_dir, step, model, optimizer, scheduler, rng)
        if stop_after is not None and step >= stop_after:
            break
    adapter_dir = run_dir / "adapter"
    if rank == 0 and (stop_after is None or stop_after >= total_steps):
        with atomic_path(adapter_dir) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
    return TrainResult(run_dir, adapter_dir, history, heldout, model, tokenizer)
