"""Checkpoints of a training run: adapter (safetensors) and trainer state (tensors and numbers, loaded with
weights_only), written atomically by the main process, so a resumed run reproduces the uninterrupted one.

Under FSDP the adapter and the optimizer state are gathered whole (torch.distributed.checkpoint's full state dicts)
before the main process writes them, and scattered back on resume: a sharded run resumes under FSDP with any number
of processes. Unsharded runs (one process, DDP) keep the optimizer's own state dict, so they resume under any number
of processes too.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from cpwb.core.errors import ConfigError
from cpwb.core.files import atomic_path


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The trainable LoRA weights, on CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def _full_adapter(module) -> dict[str, torch.Tensor]:
    """The adapter of a fully sharded module, gathered whole onto the CPU (a collective: every process calls)."""
    from peft import get_peft_model_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {k.removeprefix("model."): v for k, v in get_model_state_dict(module, options=options).items()}
    return {k: v.contiguous() for k, v in get_peft_model_state_dict(module.model, state_dict=weights).items()}


def _full_state(module, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter and the optimizer state of a fully sharded module, gathered whole (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return _full_adapter(module), get_optimizer_state_dict(module, optimizer, options=options)


def save_adapter(folder: Path, model, base_name: str, sharded=None, main: bool = True) -> Path:
    """The trained adapter as peft writes it (adapter_config.json, adapter_model.safetensors), naming its base model
    as the user gave it (`base_name`, e.g. smollm2-135m-instruct, a hub id or a path) rather than a cache folder.

    `sharded`: the fully sharded module, whose adapter is gathered first (every process calls; `main` writes).
    """
    from safetensors.torch import save_file

    adapter = _full_adapter(sharded) if sharded is not None else None
    if not main:
        return folder
    with atomic_path(folder) as tmp:
        if adapter is None:
            model.save_pretrained(str(tmp), safe_serialization=True)
        else:
            tmp.mkdir()
            save_file(adapter, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            model.peft_config["default"].save_pretrained(str(tmp))
        local = model.peft_config["default"].base_model_name_or_path or ""
        config = json.loads((tmp / "adapter_config.json").read_text())
        (tmp / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base_name},
                                                            indent=2, sort_keys=True))
        card = tmp / "README.md"
        if card.is_file() and local:
            card.write_text(card.read_text(encoding="utf-8").replace(local, base_name), encoding="utf-8")
    return folder


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, rng: random.Random, sharded=None,
                    main: bool = True) -> Path:
    """Write adapter (safetensors) and trainer state (tensors and numbers only) into checkpoints/step-N/.

    `sharded`: the fully sharded module (every process must call, only `main` writes).
    """
    from safetensors.torch import save_file

    adapter, optimizer_state = _full_state(sharded, optimizer) if sharded is not None else (None, None)
    path = run_dir / "checkpoints" / f"step-{step:06d}"
    if not main:
        return path
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file(adapter if adapter is not None else adapter_state(model), str(tmp / "adapter.safetensors"))
        torch.save({"step": step, "optimizer": optimizer_state or optimizer.state_dict(),
                    "optimizer_format": "full" if sharded is not None else "local",
                    "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                    "python_rng": json.dumps(rng.getstate())}, tmp / "trainer_state.pt")
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (temporary ones are never named step-N)."""
    found = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "trainer_state.pt").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler, rng: random.Random, module=None) -> int:
    """Restore a checkpoint written by save_checkpoint (weights_only loading); returns its step.

    A checkpoint of a sharded run (its state gathered whole) is scattered into `module`, the trained module, sharded
    or not: it resumes under any number of processes. An unsharded run's checkpoint resumes unsharded.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = load_file(str(path / "adapter.safetensors"))
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    if state.get("optimizer_format") == "full":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        names = {k.replace(".default.", "."): k for k in module.model.state_dict() if "lora_" in k}
        set_model_state_dict(module, {f"model.{names.get(k, k)}": v for k, v in adapter.items()}, options=options)
        set_optimizer_state_dict(module, optimizer, state["optimizer"], options=options)
    elif module is not None and hasattr(module, "set_requires_gradient_sync"):
        raise ConfigError(f"{path} was written by an unsharded run: resume it with one process or distributed: ddp",
                          field="distributed")
    else:
        set_peft_model_state_dict(model, adapter)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    version, internal, gauss = json.loads(state["python_rng"])
    rng.setstate((version, tuple(internal), gauss))
    return int(state["step"])
