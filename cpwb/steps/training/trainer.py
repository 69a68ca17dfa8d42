"""The CP trainer: LoRA (or 4-bit QLoRA) on any causal LM, resumable, with per-step metrics.

Each optimizer step takes `anchors_per_step` anchors (x `grad_accum`), scores all their positives and negatives
with the NLL engine in one length-sorted batch, and applies the configured objective from cpwb.engine.loss. Checkpoints
(adapter, optimizer, scheduler, RNG, step) are written atomically every `checkpoint_every` steps; `resume=True`
continues from the last one to the same final adapter as an uninterrupted run. Data-parallel runs go through
`accelerate launch -m cpwb.steps.training.trainer --config ...`: each process takes its share of the anchors and the LoRA
gradients are averaged across processes.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from cpwb.core.config import require, to_dict
from cpwb.core.errors import ConfigError, CpwbError
from cpwb.core.files import (
    append_jsonl,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    read_jsonl_tolerant,
)
from cpwb.data.corpora import general_texts
from cpwb.data.pairs import PairRecord
from cpwb.data.paradetox import HOLDOUT_FRACTION, PARADETOX_ROWS
from cpwb.engine import loss as losses
from cpwb.engine.device import peak_memory_mb, pick_device
from cpwb.engine.nll import (
    SequenceNLL,
    TokenBatch,
    encode,
    packing_matches,
    scored_states,
    sequence_kl,
    sequence_nll,
)

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


# ----------------------------------------------------------------------------------------------- data


def load_training_pairs(config: TrainConfig) -> tuple[list[PairRecord], list[PairRecord], dict[str, Any]]:
    """(train, held-out) pairs and a record of where they came from (file hashes, counts).

    ParaDetox pairs are split by `holdout_fraction`. A pairs file is split the same way, or, `with_paradetox`, all
    of it trains together with ParaDetox's training split (its records replace ParaDetox's of the same id) and the
    held-out pairs are ParaDetox's. Whatever the source, the canonical held-out ParaDetox pairs
    (`cpwb.data.pairs.paradetox_heldout`) never train, so every analysis can measure on them.
    """
    from cpwb.data.corpora import data_hash, data_path, load_paradetox
    from cpwb.data.pairs import read_pairs
    from cpwb.data.paradetox import pairs_from_paradetox, paradetox_heldout, split_pairs

    def paradetox_split() -> tuple[list[PairRecord], list[PairRecord]]:
        records = pairs_from_paradetox(load_paradetox(limit=config.paradetox_limit), normalize=config.normalize_text)
        return split_pairs(records, config.holdout_fraction, seed=0)

    paradetox = {"paradetox_hash": data_hash([data_path("paradetox")]), "normalized": config.normalize_text}
    if config.pairs:
        records = list(read_pairs(config.pairs))
        source: dict[str, Any] = {"pairs": config.pairs, "data_hash": data_hash([config.pairs]),
                                  "n_file": len(records)}
        if config.with_paradetox:
            ids = {r.id for r in records}
            extra_train, extra_heldout = paradetox_split()
            train = records + [r for r in extra_train if r.id not in ids]
            heldout = [r for r in extra_heldout if r.id not in ids]
            source |= {"with_paradetox": True, **paradetox}
        else:
            train, heldout = split_pairs(records, config.holdout_fraction, seed=0)
    else:
        train, heldout = paradetox_split()
        source = {"pairs": "paradetox", "data_hash": paradetox["paradetox_hash"], **paradetox}
    reserved = {r.id for r in paradetox_heldout()}
    kept = [r for r in train if r.id not in reserved]
    if not kept:
        raise ConfigError(f"no training anchors left ({len(train)} before the canonical held-out ParaDetox pairs "
                          "were taken out)", field="pairs")
    return kept, heldout, {**source, "n_train": len(kept), "n_heldout": len(heldout),
                           "n_reserved_left_out": len(train) - len(kept)}


def anchor_order(n_anchors: int, seed: int, count: int, offset: int = 0) -> list[int]:
    """Indices of the anchors used at positions offset..offset+count of a seeded stream of shuffled epochs."""
    order: list[int] = []
    epoch = offset // n_anchors
    while len(order) < (offset % n_anchors) + count:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order += torch.randperm(n_anchors, generator=generator).tolist()
        epoch += 1
    start = offset % n_anchors
    return order[start:start + count]


@dataclass
class AnchorBatch:
    """The texts of a few anchors, flattened, with the slot of each text in the [A, K] layout of cpwb.engine.loss."""

    texts: list[str]
    role: list[str]  # "pos" | "neg" | "rand"
    anchor: list[int]
    slot: list[int]
    n_anchors: int
    sizes: dict[str, int]  # K per role


def build_anchor_batch(records: list[PairRecord], indices: list[int], config: TrainConfig,
                       rng: random.Random, general: list[str] | None = None) -> AnchorBatch:
    """Positives and negatives (and optional random negatives from other anchors) of the chosen anchors.

    With a `general` pool, `kl_texts_per_step` of its texts join the batch (role "kl") for the KL-to-base term only.
    """
    batch = AnchorBatch([], [], [], [], len(indices), {"pos": 0, "neg": 0, "rand": 0, "kl": 0})

    def add(text: str, role: str, a: int, s: int) -> None:
        batch.texts.append(text)
        batch.role.append(role)
        batch.anchor.append(a)
        batch.slot.append(s)
        batch.sizes[role] = max(batch.sizes[role], s + 1)

    for a, index in enumerate(indices):
        record = records[index]
        for s, text in enumerate(record.positives[:config.max_positives]):
            add(text.text, "pos", a, s)
        for s, text in enumerate(record.negatives[:config.max_negatives]):
            add(text.text, "neg", a, s)
        others = [j for j in range(len(records)) if j != index]
        for s, j in enumerate(rng.sample(others, min(config.random_negatives, len(others)))):
            add(records[j].negatives[0].text, "rand", a, s)
    for s, text in enumerate(rng.sample(general, config.kl_texts_per_step) if general else []):
        add(text, "kl", 0, s)
    return batch


def reference_token_batch(tokenizer, texts: list[str], max_length: int = 256) -> TokenBatch:
    """Tokens as the paper's released code builds them: EOS appended, left padding with EOS, every step scored.

    Its per-sequence mean then runs over the padded length, padding and the pad-to-first-token step included.
    """
    eos = tokenizer.eos_token_id
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length - 1] + [eos] for t in texts]
    width = max(len(i) for i in ids)
    input_ids = torch.full((len(ids), width), eos, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, width - len(seq):] = torch.tensor(seq)
        attention[row, width - len(seq):] = 1
    target = torch.ones_like(input_ids, dtype=torch.bool)
    target[:, 0] = False
    return TokenBatch(input_ids, attention, target)


def to_slots(values: torch.Tensor, batch: AnchorBatch, role: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-text values scattered into an [A, K] tensor for one role, with its bool mask."""
    rows = [i for i, r in enumerate(batch.role) if r == role]
    out = values.new_zeros(batch.n_anchors, max(batch.sizes[role], 1))
    mask = torch.zeros(out.shape, dtype=torch.bool, device=values.device)
    if rows:
        a = torch.tensor([batch.anchor[i] for i in rows], device=values.device)
        s = torch.tensor([batch.slot[i] for i in rows], device=values.device)
        out = out.index_put((a, s), values[rows])
        mask[a, s] = True
    return out, mask


# ----------------------------------------------------------------------------------------------- loss


def objective_loss(model, tokenizer, batch: AnchorBatch, config: TrainConfig, device: torch.device,
                   packed: bool = False) -> tuple[torch.Tensor, dict[str, float], int]:
    """The configured objective on one anchor batch: (loss, metrics, real tokens processed)."""
    if config.objective == "reference":
        tokens = reference_token_batch(tokenizer, batch.texts, config.max_length).to(device)
        stats = sequence_nll(model, tokens)
        m = torch.nan_to_num(stats.phi, nan=losses.REFERENCE_NONFINITE_FILL, posinf=losses.REFERENCE_NONFINITE_FILL)
        pos, _ = to_slots(m, batch, "pos")
        neg, _ = to_slots(m, batch, "neg")
        rand, _ = to_slots(m, batch, "rand")
        value = losses.reference_cp_loss(pos, neg[:, :batch.sizes["neg"]], rand[:, :batch.sizes["rand"]],
                                         tau=config.tau, alpha=config.alpha)
        return value, {"phi_pos": pos.mean().item(), "phi_neg": neg.mean().item()}, int(tokens.attention_mask.sum())
    tokens = encode(tokenizer, batch.texts, max_length=config.max_length).to(device)
    stats = sequence_nll(model, tokens, keep_states=config.kl_weight > 0, packed=packed,
                         return_token_nll=config.objective == "negatives_only")
    phi = stats.phi
    phi_pos, pos_mask = to_slots(phi, batch, "pos")
    negative_roles = ("neg", "rand") if batch.sizes["rand"] else ("neg",)
    neg_parts = [to_slots(phi, batch, r) for r in negative_roles]
    phi_neg = torch.cat([p for p, _ in neg_parts], 1)
    neg_mask = torch.cat([m for _, m in neg_parts], 1)
    is_pos = torch.tensor([r == "pos" for r in batch.role], device=phi.device)
    is_neg = torch.tensor([r in negative_roles for r in batch.role], device=phi.device)
    metrics = {"phi_pos": phi[is_pos].mean().item(), "phi_neg": phi[is_neg].mean().item()}
    if config.objective == "cp":
        out = losses.cp_loss(phi_pos, pos_mask, phi_neg, neg_mask, config.loss_config())
        metrics |= {"log_j": out.log_j.mean().item(), "contrastive": out.contrastive.item(),
                    "anchor": out.anchor.item()}
        value = out.loss
    elif config.objective == "positives_only":
        value = losses.positives_only_loss(phi_pos, pos_mask)
    elif config.objective == "negatives_only":
        unlikelihood = losses.token_unlikelihood(stats.token_nll, tokens.target_mask)
        value = losses.negatives_only_loss(torch.cat([to_slots(unlikelihood, batch, r)[0] for r in negative_roles], 1),
                                           neg_mask)
    elif config.objective == "simpo":
        value = losses.simpo_loss(-phi_pos, -phi_neg, pos_mask, neg_mask, config.simpo_beta, config.simpo_gamma)
    else:  # dpo: sequence log-probs under the policy and under the frozen base (adapter disabled)
        with torch.no_grad(), model.disable_adapter():
            reference = sequence_nll(model, tokens, packed=packed)
        value = losses.dpo_loss(*_logp_slots(stats, batch, negative_roles),
                                *_logp_slots(reference, batch, negative_roles), pos_mask, neg_mask,
                                beta=config.preference_beta)
    if config.kl_weight > 0:
        kl_rows = is_pos if config.kl_data == "positives" else torch.tensor([r == "kl" for r in batch.role],
                                                                            device=phi.device)
        kl = base_kl(model, tokens, stats, kl_rows, packed)
        metrics["kl"] = kl.item()
        value = value + config.kl_weight * kl
    return value, metrics, int(tokens.attention_mask.sum())


def base_kl(model, tokens: TokenBatch, stats: SequenceNLL, rows: torch.Tensor, packed: bool = False) -> torch.Tensor:
    """Mean over the selected texts of their mean token KL(frozen base || model): the base is the adapter disabled.

    The base runs on the selected texts only, and the KL's full-vocabulary logits are computed for their tokens only.
    """
    with torch.no_grad(), model.disable_adapter():
        base_states, _, _ = scored_states(model, tokens.select(rows), packed=packed)
    return sequence_kl(model, stats, base_states, rows)[rows].mean()


def _logp_slots(stats: SequenceNLL, batch: AnchorBatch, negative_roles: tuple[str, ...]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probabilities (-NLL sums) of positives and negatives in [A, K] layout."""
    logp_pos, _ = to_slots(-stats.nll_sum, batch, "pos")
    logp_neg = torch.cat([to_slots(-stats.nll_sum, batch, r)[0] for r in negative_roles], 1)
    return logp_pos, logp_neg


# ----------------------------------------------------------------------------------------------- model


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


# ----------------------------------------------------------------------------------------------- checkpoints


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


# ----------------------------------------------------------------------------------------------- loop


def use_packing(model, tokenizer, records: list[PairRecord], config: TrainConfig, device: torch.device) -> bool:
    """Whether packed rows give this model's padded values (else warn and pad): checked once on training texts."""
    texts = [t.text for r in records[:4] for t in (*r.positives[:2], *r.negatives[:2])]
    if packing_matches(model, encode(tokenizer, texts, max_length=config.max_length).to(device)):
        return True
    warnings.warn(f"{config.model}: packed sequences do not match padded ones (the model ignores per-text position "
                  "ids); training on padded batches instead", stacklevel=2)
    return False


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
        _require_same_settings(run_dir / "config.yaml", config)
    if checkpoint is not None:
        start = load_checkpoint(checkpoint, model, optimizer, scheduler, rng)
    metrics_path = run_dir / "metrics.jsonl"
    kept = [m for m in read_jsonl_tolerant(metrics_path) if m["step"] <= start] if start else []
    atomic_write_text(metrics_path, "".join(json.dumps(m, sort_keys=True) + "\n" for m in kept))
    if rank == 0:
        atomic_write_text(run_dir / "config.yaml", _yaml(to_dict(config)))
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


def _require_same_settings(saved: Path, config: TrainConfig) -> None:
    """Refuse to resume a run folder that was started with other settings (a moved or copied folder is fine)."""
    import yaml

    before = yaml.safe_load(saved.read_text()) if saved.is_file() else {}
    now = to_dict(config)
    changed = sorted(k for k in now if k not in ("progress", "output_dir") and before.get(k) != now[k])
    if changed:
        raise ConfigError(f"{saved.parent} holds a run with other settings ({', '.join(changed)}); resume it with "
                          "the same settings, or use another output_dir", field="output_dir")


def _yaml(data: dict[str, Any]) -> str:
    """A config dict as YAML."""
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    """`accelerate launch -m cpwb.steps.training.trainer --config ...`: the same as `cpwb train`."""
    from cpwb.app.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
