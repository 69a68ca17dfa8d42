"""Training beyond one process: accelerate for processes, devices, reductions and trackers; DDP or FSDP underneath.

`accelerate launch -m cpwb train ...` (GPUs) or `torchrun --nproc_per_node N -m cpwb train --device cpu ...` (CPU,
gloo) start N processes; `Accelerator` joins them. The model and its objective are one module (`Objective`), so the
wrapper's forward is the whole loss: DDP's reducer and FSDP's all-gathers see every parameter the NLL engine uses,
even though the engine calls the transformer body and the LM head directly.

- ddp: `Accelerator.prepare` wraps the module in DistributedDataParallel (bucketed gradient all-reduce);
  micro-batches before the last of a step run under `Accelerator.no_sync`.
- fsdp: torch's `fully_shard` (FSDP2) on every decoder layer and on the module, over all processes. accelerate's
  FSDP plugin does the same on GPUs, but its state switches to FSDP only for GPU-like devices (on `MULTI_CPU` it
  ignores the plugin), so cpwb applies `fully_shard` itself: one path for CPU (gloo) and GPU. Gradient accumulation
  turns the gradient reduce-scatter off until the last micro-batch (`set_requires_gradient_sync`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from cpwb.core.errors import ConfigError
from cpwb.steps.training.batches import AnchorBatch
from cpwb.steps.training.config import TrainConfig
from cpwb.steps.training.objective import objective_loss


class Objective(torch.nn.Module):
    """The model with its training objective: forward(batch) is the loss (and metrics, tokens) of one batch.

    `loss` is cpwb.steps.training.objective.objective_loss unless another is given (the trainer passes its own
    reference, which tests replace to inject faults).
    """

    def __init__(self, model, tokenizer, config: TrainConfig, device: torch.device, packed: bool,
                 loss: Callable = objective_loss) -> None:
        super().__init__()
        self.model = model
        self.tokenizer, self.config, self.device, self.packed, self.loss = tokenizer, config, device, packed, loss

    def forward(self, batch: AnchorBatch) -> tuple[torch.Tensor, dict[str, float], int]:
        return self.loss(self.model, self.tokenizer, batch, self.config, self.device, self.packed)


def make_accelerator(config: TrainConfig):
    """The run's Accelerator: CPU when `device` is cpu (or no accelerator is present), trackers from `report_to`.

    Under a launcher only `auto` and `cpu` make sense (each process gets its device from the launcher): any other
    `device` is refused with one line.
    """
    from accelerate import Accelerator, PartialState

    state = PartialState(cpu=config.device == "cpu")
    if state.num_processes > 1 and config.device not in ("auto", "cpu"):
        raise ConfigError(f"{config.device!r} under a launcher of {state.num_processes} processes: each process gets "
                          "its device from the launcher; use device: auto (or cpu)", field="device")
    trackers = list(config.report_to) or None
    return Accelerator(cpu=state.device.type == "cpu", log_with=trackers, project_dir=f"{config.output_dir}/tracking",
                       device_placement=config.device in ("auto", "cpu"))


def _decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks of a (peft-wrapped) causal LM: what FSDP shards one by one."""
    from cpwb.core.errors import InputError
    from cpwb.engine.nll import decoder_layers

    try:
        return list(decoder_layers(model))
    except InputError:
        raise ConfigError(f"{type(model).__name__} has no decoder layers to shard; use distributed: ddp",
                          field="distributed") from None


def wrap(objective: Objective, accelerator, config: TrainConfig) -> torch.nn.Module:
    """The module the training loop calls: as is in one process, DDP-wrapped, or fully sharded (FSDP2)."""
    if accelerator.num_processes == 1:
        return objective
    if config.distributed == "ddp":
        return accelerator.prepare(objective)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    for layer in _decoder_layers(objective.model):
        fully_shard(layer, mesh=mesh)
    fully_shard(objective, mesh=mesh)
    return objective


def no_gradient_sync(module: torch.nn.Module, accelerator, last: bool):
    """Context for one micro-batch: gradients are reduced across processes only on the step's last one."""
    if last or accelerator.num_processes == 1:
        return contextlib.nullcontext()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(module)
    return accelerator.no_sync(module)


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def is_sharded(module: torch.nn.Module) -> bool:
    """True for a module wrapped by FSDP2's fully_shard."""
    return hasattr(module, "set_requires_gradient_sync")


def reduced(accelerator, values: dict[str, float], how: dict[str, str]) -> dict[str, float]:
    """Per-process numbers combined over processes: `how[key]` is sum, max or mean (the default)."""
    if accelerator.num_processes == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    gathered = accelerator.gather(tensor[None]).reshape(accelerator.num_processes, len(keys))
    out: dict[str, Any] = {}
    for i, key in enumerate(keys):
        column = gathered[:, i]
        kind = how.get(key, "mean")
        out[key] = float(column.sum() if kind == "sum" else column.max() if kind == "max" else column.mean())
    return out
