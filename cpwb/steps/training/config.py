"""Every setting of a training run, with its default, range and help text (`cpwb train --help` lists them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cpwb.core.config import require
from cpwb.data.paradetox import HOLDOUT_FRACTION, PARADETOX_ROWS
from cpwb.engine import loss as losses

Objective = Literal["cp", "reference", "positives_only", "negatives_only", "dpo", "simpo"]


@dataclass
class TrainConfig:
    """Every setting of a training run; the YAML files in configs/ mirror it."""

    # model
    model: str = "default"
    trust_remote_code: bool = False
    device: str = "auto"  # auto: CUDA when present (bf16), else CPU (fp32)
    dtype: str | None = None
    load_in_4bit: bool = False  # NF4 QLoRA through bitsandbytes (the `gpu` extra)
    gradient_checkpointing: bool = False
    # data: a pairs file (notebook 01), or pairs built from ParaDetox when it is null
    pairs: str | None = None
    with_paradetox: bool = False  # with a pairs file: train on it together with ParaDetox's training pairs
    paradetox_limit: int = PARADETOX_ROWS
    normalize_text: bool = True  # same casing/spacing on both sides (ParaDetox's formatting confound)
    holdout_fraction: float = HOLDOUT_FRACTION
    max_positives: int = 3
    max_negatives: int = 3
    random_negatives: int = 0  # toxic texts of other anchors added as negatives
    max_length: int = 128
    packing: bool = True  # run each step's texts as one padding-free row (checked against padding at start)
    # objective (see cpwb.engine.loss)
    objective: Objective = "cp"
    negatives: Literal["directional", "symmetric"] = "directional"
    tau: float = 0.5
    alpha: float = 1.0
    anchor_weight: float = 1.0
    kl_weight: float = 2.0  # + kl_weight * mean token KL(base || model) on `kl_data` (keeps non-toxic text as it was)
    kl_data: Literal["positives", "general"] = "general"  # general: benign web text (cpwb.data.corpora.general_texts)
    kl_texts_per_step: int = 4  # general texts per micro-batch when kl_data is general
    phi_form: Literal["log_ppl", "ppl"] = "log_ppl"
    detach_prototype: bool = True
    prototype: Literal["mean_positives", "first_positive"] = "mean_positives"
    preference_beta: float = 0.1  # DPO beta (SimPO uses simpo_beta)
    simpo_beta: float = 2.0
    simpo_gamma: float = 0.5
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # optimisation
    steps: int = 200  # optimizer steps; 0 means one epoch over the training anchors
    anchors_per_step: int = 4
    grad_accum: int = 1
    lr: float = 4e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    output_dir: str = "outputs/train"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("tau", "lr", "max_grad_norm"):
            require(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("alpha", "anchor_weight", "kl_weight", "weight_decay", "lora_dropout", "random_negatives", "steps",
                     "warmup_steps", "max_negatives"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("kl_texts_per_step", "max_positives", "anchors_per_step", "grad_accum", "lora_r", "lora_alpha",
                     "max_length", "checkpoint_every", "paradetox_limit"):
            require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        require(self.max_negatives + self.random_negatives >= 1, "max_negatives",
                "must be >= 1 unless random_negatives >= 1 (0 with random negatives: random toxic negatives only)")
        require(0 <= self.holdout_fraction < 1, "holdout_fraction", f"must be in [0, 1), got {self.holdout_fraction}")
        require(bool(self.target_modules), "target_modules", "must name at least one module")
        require(self.pairs is None or Path(self.pairs).is_file(), "pairs", f"file not found: {self.pairs}")
        require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), "device",
                f"must be auto, cpu, cuda[:N] or mps, got {self.device!r}")
        require(self.dtype in (None, "float32", "bfloat16", "float16"), "dtype",
                f"must be null, float32, bfloat16 or float16, got {self.dtype!r}")
        self.loss_config()  # its own checks: tau, alpha and anchor_weight finite (YAML .inf passes the ones above)

    def loss_config(self) -> losses.CPLossConfig:
        """The CP loss settings of this run."""
        return losses.CPLossConfig(negatives=self.negatives, tau=self.tau, alpha=self.alpha,
                                   phi_form=self.phi_form, detach_prototype=self.detach_prototype,
                                   anchor_weight=self.anchor_weight, prototype=self.prototype)
