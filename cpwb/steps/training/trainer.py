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
from cpwb.core.errors import ConfigError, CpwbError
from cpwb.core.files import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl_tolerant
from cpwb.data.corpora import general_texts
from cpwb.data.pairs import PairRecord
from cpwb.engine.assets import model_label
from cpwb.engine.device import peak_memory_mb, pick_device
from cpwb.steps.training.batches import anchor_order, build_anchor_batch, load_training_pairs
from cpwb.steps.training.checkpoints import latest_checkpoint, load_checkpoint, save_adapter, save_checkpoint
from cpwb.steps.training.config import NOT_FITTED, RL_OBJECTIVES, TRAINING_FREE, TrainConfig
from cpwb.steps.training.distributed import Objective, is_sharded, make_accelerator, no_gradient_sync, reduced, wrap
from cpwb.steps.training.model import build_model, check_target_modules, make_optimizer, use_packing
from cpwb.steps.training.objective import objective_loss
from cpwb.steps.training.tracking import Tracking


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


def _plan(config: TrainConfig, world: int, n_pairs: int) -> int:
    """The run's optimizer steps, checking that every process gets anchors and KL texts (one line if not)."""
    if world > 1 and config.anchors_per_step < world:
        raise ConfigError(f"must be at least the number of processes ({world}): each takes its share of a "
                          "micro-batch's anchors", field="anchors_per_step")
    if world > 1 and config.kl_weight > 0 and config.kl_data == "general" and config.kl_texts_per_step < world:
        raise ConfigError(f"must be at least the number of processes ({world}) for the KL term",
                          field="kl_texts_per_step")
    return config.steps or math.ceil(n_pairs / (config.anchors_per_step * config.grad_accum))


def train(config: TrainConfig, resume: bool = False, stop_after: int | None = None) -> TrainResult:
    """Train a LoRA adapter with the configured objective; `stop_after` ends early (to test resuming).

    In several processes (a launcher), each micro-batch's anchors, random negatives and KL texts are those one
    process would draw, split over the processes; gradients are reduced by DDP or FSDP, metrics over processes, and
    only the main process writes files.
    """
    if config.objective == "dexperts":  # two adapters trained by this function, combined at decoding time
        from cpwb.steps.training.dexperts import fit_dexperts

        return fit_dexperts(config, resume=resume)
    if config.objective in TRAINING_FREE:  # ProFS, steering: fitted from hidden states, no steps
        from cpwb.steps.training.editing import fit_intervention

        return fit_intervention(config, resume=resume)
    from cpwb.steps.training import run_cache

    if stop_after is None and run_cache.restore(config):  # trained before with the same settings and code
        resume = True
    if config.objective in RL_OBJECTIVES:  # TRL's GRPO or RLOO trainer with the scorer as reward
        from cpwb.steps.training.rl import fit_rl

        result = fit_rl(config, resume=resume)
    else:
        result = _train_loop(config, resume, stop_after)
    if stop_after is None:
        run_cache.store(config)
    return result


def _train_loop(config: TrainConfig, resume: bool, stop_after: int | None) -> TrainResult:
    """cpwb's own loop, for CP and every objective of cpwb.engine.loss (see `train`)."""
    train_pairs, heldout, source = load_training_pairs(config)  # bad data fails before any weights load
    check_target_modules(config)
    accelerator = make_accelerator(config)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    total_steps = _plan(config, world, len(train_pairs))
    device = accelerator.device if config.device in ("auto", "cpu") else pick_device(config.device)
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_model(config, device)
    packed = config.packing and use_packing(model, tokenizer, train_pairs, config, device)
    module = wrap(Objective(model, tokenizer, config, device, packed, objective_loss), accelerator, config)
    sharded = module if is_sharded(module) else None
    optimizer, scheduler = make_optimizer(module, config, total_steps)
    general = general_texts() if config.kl_weight > 0 and config.kl_data == "general" else None
    rng = random.Random(config.seed)
    start = 0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        require_same_settings(run_dir / "config.yaml", to_dict(config), NOT_FITTED,
                              config_type=TrainConfig)
        start = load_checkpoint(checkpoint, model, optimizer, scheduler, rng, module)
    metrics_path = run_dir / "metrics.jsonl"
    kept = [m for m in read_jsonl_tolerant(metrics_path) if m["step"] <= start] if start else []
    if main:
        atomic_write_text(metrics_path, "".join(json.dumps(m, sort_keys=True) + "\n" for m in kept))
        atomic_write_text(run_dir / "config.yaml", yaml_text(to_dict(config)))
        atomic_write_json(run_dir / "data.json", {**source, "processes": world, "distributed": config.distributed})
    tracking = Tracking(accelerator, config)
    per_step = config.anchors_per_step * config.grad_accum
    module.train()
    history = kept
    for step in tqdm(range(start + 1, total_steps + 1), desc="CP training", initial=start, total=total_steps,
                     disable=not config.progress or not main):
        started = time.perf_counter()
        order = anchor_order(len(train_pairs), config.seed, per_step, offset=(step - 1) * per_step)
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        n_tokens = 0
        for micro in range(config.grad_accum):
            batch = build_anchor_batch(train_pairs, order[micro::config.grad_accum], config, rng, general, rank,
                                       world)
            with no_gradient_sync(module, accelerator, last=micro == config.grad_accum - 1):
                value, metrics, tokens = module(batch)
                _stop_if_non_finite("loss", value, step, run_dir)
                accelerator.backward(value / config.grad_accum)
            n_tokens += tokens
            for key, number in {"loss": value.item(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + number / config.grad_accum
        grad_norm = accelerator.clip_grad_norm_([p for p in module.parameters() if p.requires_grad],
                                                config.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        _stop_if_non_finite("gradient norm", grad_norm, step, run_dir)  # before NaN reaches weights or a checkpoint
        optimizer.step()
        scheduler.step()
        seconds = time.perf_counter() - started
        record = {"step": step, **reduced(accelerator, {**totals, "tokens": n_tokens, "step_seconds": seconds,
                                                        "peak_memory_mb": peak_memory_mb(device)},
                                          {"tokens": "sum", "step_seconds": "max", "peak_memory_mb": "max"}),
                  "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}
        record["tokens_per_s"] = record.pop("tokens") / record["step_seconds"]
        history.append(record)
        if main:
            append_jsonl(metrics_path, record)
        tracking.log(record, step)
        if step % config.checkpoint_every == 0 or step == total_steps:
            save_checkpoint(run_dir, step, model, optimizer, scheduler, rng, sharded, main)
        if stop_after is not None and step >= stop_after:
            break
    tracking.finish()
    adapter_dir = run_dir / "adapter"
    if stop_after is None or stop_after >= total_steps:
        save_adapter(adapter_dir, model, model_label(config.model), sharded, main)
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, adapter_dir, history, heldout, model, tokenizer)
