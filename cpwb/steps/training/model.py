"""The model a run trains: LoRA (or 4-bit QLoRA) on any causal LM, its target-module check, optimizer and schedule,
and the one-time check that packed rows give padded values."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from cpwb.core.errors import ConfigError
from cpwb.data.pairs import PairRecord
from cpwb.engine.nll import encode, packing_matches
from cpwb.steps.training.config import TrainConfig


def module_names(model_path: str) -> set[str] | None:
    """Names of the leaf modules of a local safetensors model, read from the file headers (no weights loaded)."""
    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    if not files:
        return None
    names: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            names |= {key.rsplit(".", 2)[-2] for key in handle.keys() if key.count(".") >= 2}
    return names


def check_target_modules(config: TrainConfig) -> None:
    """Fail before loading weights when a LoRA target module does not exist in a local model."""
    from cpwb.engine.assets import resolve_model

    names = module_names(resolve_model(config.model))
    unknown = sorted(set(config.target_modules) - names) if names is not None else []
    if unknown:
        raise ConfigError(f"unknown module(s) {unknown} in {config.model}; linear modules there include "
                          f"{sorted(n for n in names if n.endswith('proj') or n == 'lm_head')}", field="target_modules")


def build_model(config: TrainConfig, device: torch.device):
    """Load the causal LM and wrap it with a fresh LoRA adapter (QLoRA when `load_in_4bit`)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from cpwb.engine.assets import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    model = load_causal_lm(config.model, device=str(device), dtype=config.dtype,
                           trust_remote_code=config.trust_remote_code, load_in_4bit=config.load_in_4bit)
    if config.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora), tokenizer


def make_optimizer(model, config: TrainConfig, total_steps: int):
    """AdamW over the trainable (LoRA) parameters with linear warm-up then linear decay to zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - config.warmup_steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def use_packing(model, tokenizer, records: list[PairRecord], config: TrainConfig, device: torch.device) -> bool:
    """Whether packed rows give this model's padded values (else warn and pad): checked once on training texts."""
    texts = [t.text for r in records[:4] for t in (*r.positives[:2], *r.negatives[:2])]
    if packing_matches(model, encode(tokenizer, texts, max_length=config.max_length).to(device)):
        return True
    warnings.warn(f"{config.model}: packed sequences do not match padded ones (the model ignores per-text position "
                  "ids); training on padded batches instead", stacklevel=2)
    return False
