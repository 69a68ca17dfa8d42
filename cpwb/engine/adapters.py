"""LoRA adapters on their base model: find one, load it, and switch it off to run the base model.

A run folder's adapter is `<run>/train/adapter` (what notebook 02 and `cpwb train` write). "The base model" of a
peft model is always the same model with its adapter disabled (`base_of`), never a second copy in memory.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpwb.core.errors import InputError

ADAPTER_CONFIG = "adapter_config.json"
RUN_ADAPTER = Path("train") / "adapter"  # where a run folder keeps notebook 02's adapter


def is_adapter(folder: str | Path) -> bool:
    """True when `folder` holds a peft adapter (its adapter_config.json)."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def find_adapter(adapter: str | None, run_dir: str | Path) -> Path | None:
    """The adapter to use: `adapter` when given (it must be one), else notebook 02's in `run_dir`, else None."""
    if adapter:
        if not is_adapter(adapter):
            raise InputError(f"not an adapter folder (no {ADAPTER_CONFIG})", adapter, field="adapter")
        return Path(adapter)
    candidate = Path(run_dir) / RUN_ADAPTER
    return candidate if is_adapter(candidate) else None


def load_adapter(adapter_dir: str | Path, model: str = "default", device: str = "cpu",
                 trust_remote_code: bool = False):
    """A trained adapter on its base model (safetensors), in eval mode; returns (model, tokenizer)."""
    from peft import PeftModel

    from cpwb.engine.assets import load_causal_lm, load_tokenizer

    base = load_causal_lm(model, device=device, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval(), load_tokenizer(model, trust_remote_code)


@contextlib.contextmanager
def base_of(model) -> Iterator[Any]:
    """Inside the block `model` runs as its base: a peft model with its adapter disabled, any other model as is."""
    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        yield model


@dataclass(frozen=True)
class Side:
    """A model to compare, and how to switch it on (a peft model's base side runs `base_of` it)."""

    label: str
    model: Any
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def base_and_cp_sides(cp_model, base_model=None, labels: tuple[str, str] = ("base", "CP")) -> tuple[Side, Side]:
    """The two sides: `base_model` if given, else `cp_model` with its (peft) adapter disabled; then `cp_model`."""
    if base_model is not None:
        return Side(labels[0], base_model), Side(labels[1], cp_model)
    if not hasattr(cp_model, "disable_adapter"):
        raise InputError("pass base_model, or a peft model whose adapter can be disabled", field="cp_model")
    return Side(labels[0], cp_model, lambda: base_of(cp_model)), Side(labels[1], cp_model)
