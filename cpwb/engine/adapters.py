"""What a run fits on its base model: a LoRA adapter, a training-free intervention (ProFS, steering; see
cpwb.engine.interventions) or a DExperts pair of adapters (cpwb.engine.dexperts). Find one, load it, and switch it
off to run the base model.

A run folder's adapter is `<run>/train/adapter` (what notebook 02 and `cpwb train` write; for the training-free
methods that folder holds the intervention). "The base model" of a peft or intervened model is always the same model
with its adapter or intervention off (`base_of`), never a second copy in memory.
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
    """True when `folder` holds a peft adapter (its adapter_config.json) or a cpwb intervention."""
    from cpwb.engine.dexperts import is_dexperts
    from cpwb.engine.interventions import is_intervention

    return (Path(folder) / ADAPTER_CONFIG).is_file() or is_intervention(folder) or is_dexperts(folder)


def adapter_fingerprint(folder: str | Path) -> str | None:
    """A hash of what an adapter or intervention does (weights, and an intervention's settings), for keying its
    evaluations; None when there is nothing there."""
    from cpwb.core.files import sha256_file
    from cpwb.engine.dexperts import dexperts_files, is_dexperts
    from cpwb.engine.interventions import INTERVENTION_FILE, WEIGHTS_FILE, is_intervention

    if is_dexperts(folder):
        paths = dexperts_files(folder)
    else:
        files = [WEIGHTS_FILE, INTERVENTION_FILE] if is_intervention(folder) else ["adapter_model.safetensors"]
        paths = [Path(folder) / name for name in files]
    return "+".join(sha256_file(p) for p in paths) if all(p.is_file() for p in paths) else None


def find_adapter(adapter: str | None, run_dir: str | Path) -> Path | None:
    """The adapter to use: `adapter` when given (it must be one), else notebook 02's in `run_dir`, else None."""
    if adapter:
        if not is_adapter(adapter):
            raise InputError(f"not an adapter folder (no {ADAPTER_CONFIG} or intervention.json)", adapter,
                             field="adapter")
        return Path(adapter)
    candidate = Path(run_dir) / RUN_ADAPTER
    return candidate if is_adapter(candidate) else None


def load_adapter(adapter_dir: str | Path, model: str = "default", device: str = "cpu",
                 trust_remote_code: bool = False):
    """A trained adapter or a fitted intervention on its base model (safetensors), in eval mode; returns (model,
    tokenizer)."""
    from cpwb.engine.assets import load_causal_lm, load_tokenizer
    from cpwb.engine.dexperts import is_dexperts, load_dexperts
    from cpwb.engine.interventions import is_intervention, load_intervention

    if is_dexperts(adapter_dir):
        base = load_causal_lm(model, device=device, trust_remote_code=trust_remote_code)
        return load_dexperts(adapter_dir, base), load_tokenizer(model, trust_remote_code)
    if is_intervention(adapter_dir):
        intervention = load_intervention(adapter_dir)  # a malformed artefact fails before the weights load
        base = load_causal_lm(model, device=device, trust_remote_code=trust_remote_code).eval()
        return intervention.attach(base), load_tokenizer(model, trust_remote_code)
    from peft import PeftModel

    base = load_causal_lm(model, device=device, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval(), load_tokenizer(model, trust_remote_code)


@contextlib.contextmanager
def base_of(model) -> Iterator[Any]:
    """Inside the block `model` runs as its base: a peft model with its adapter disabled, an intervened model without
    its intervention, any other model as is."""
    from cpwb.engine.interventions import attached, suspended

    if hasattr(model, "as_base"):  # DExperts: the base pass alone
        context = model.as_base()
    elif attached(model) is not None:
        context = suspended(model)
    else:
        context = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with context:
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
    from cpwb.engine.interventions import attached

    if not hasattr(cp_model, "disable_adapter") and not hasattr(cp_model, "as_base") and attached(cp_model) is None:
        raise InputError("pass base_model, or a peft or intervened model whose adapter can be disabled",
                         field="cp_model")
    return Side(labels[0], cp_model, lambda: base_of(cp_model)), Side(labels[1], cp_model)
