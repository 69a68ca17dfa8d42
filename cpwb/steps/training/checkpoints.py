"""Checkpoints of a training run: adapter (safetensors) and trainer state (tensors and numbers, loaded with
weights_only), written atomically, so a resumed run reproduces the uninterrupted one."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from cpwb.core.files import atomic_path


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The trainable LoRA weights, on CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, rng: random.Random) -> Path:
    """Write adapter (safetensors) and trainer state (tensors and numbers only) into checkpoints/step-N/."""
    from safetensors.torch import save_file

    path = run_dir / "checkpoints" / f"step-{step:06d}"
    with atomic_path(path) as tmp:
        tmp.mkdir()
        save_file(adapter_state(model), str(tmp / "adapter.safetensors"))
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "python_rng": json.dumps(rng.getstate())},
                   tmp / "trainer_state.pt")
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (temporary ones are never named step-N)."""
    found = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "trainer_state.pt").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler, rng: random.Random) -> int:
    """Restore a checkpoint written by save_checkpoint (weights_only loading); returns its step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(path / "adapter.safetensors")))
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    version, internal, gauss = json.loads(state["python_rng"])
    rng.setstate((version, tuple(internal), gauss))
    return int(state["step"])
