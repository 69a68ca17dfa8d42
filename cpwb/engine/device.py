"""Where a model runs and in which mode: the device choice, eval mode for a block, the pad id, memory and the name.

`auto` is CUDA when present (each process its own GPU under `accelerate launch`), else CPU.
"""
from __future__ import annotations

import contextlib
import os
import platform
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cpwb.core.settings import setting


@dataclass
class ModelSettings:
    """The settings every step that loads a model shares; their configs take these fields (`same_as`)."""

    model: str = setting("default", "the causal LM: 'default' (the embedded SmolLM2-135M-Instruct), a Hugging Face id "
                                    "or a local folder")
    trust_remote_code: bool = setting(False, "run Python code shipped with the model (only for models you trust)")
    device: str = setting("auto", "auto: CUDA when present, else CPU; or cpu, cuda[:N], mps", check="device")


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; under `accelerate launch` each process gets its own GPU."""
    if name != "auto":
        return torch.device(name)
    from accelerate import PartialState

    return PartialState().device


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode inside the block (no dropout), its train/eval mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on GPU, process max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name() -> str:
    """The accelerator's name, else the CPU model with the number of cores and torch threads."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
