"""The CP training step, naive path vs cpwb path, side by side in one process on the same batches.

naive: `model(...).logits` in fp32 for the whole padded batch, cross-entropy with reduction='none', masked mean
(what the released code and a plain Hugging Face loop do). cpwb: the trainer's engine, `cpwb.engine.nll.sequence_nll`
(packed rows without padding, LM head only on scored positions, chunked fp32 log-softmax). Both then take the same
CP loss, backward and AdamW step on one LoRA model. Architectures are built from their configs with random weights
(speed does not depend on weight values), or the real embedded default model (`default`).

    python -m cpwb.app.bench --shape default --repeats 10          # CPU target: cpwb >= 1.5x naive
    python -m cpwb.app.bench --shape mistral-7b --anchors 6 --positives 5 --negatives 5 --lora-r 64   # GPU
"""
from __future__ import annotations

import argparse
import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cpwb.core.config import require
from cpwb.core.settings import check_settings, setting
from cpwb.engine import loss as losses
from cpwb.engine.nll import TokenBatch, encode, sequence_nll

# Architectures by name: (config class, fields). SmolLM2-135M and Mistral-7B as published.
SHAPES: dict[str, tuple[str, dict]] = {
    "smollm2-135m": ("LlamaConfig", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                         max_position_embeddings=8192, rope_theta=100000.0,
                                         tie_word_embeddings=True)),
    "mistral-7b": ("MistralConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                         max_position_embeddings=32768, rope_theta=10000.0, sliding_window=None,
                                         tie_word_embeddings=False)),
}
PATHS = ("naive", "cpwb")


@dataclass
class BenchConfig:
    """One benchmark setting: the model shape, the batch of anchors and the LoRA adapter."""

    shape: str = setting("default", f"'default' (the embedded weights), or a shape built with random weights: "
                                    f"{', '.join(SHAPES)}")
    anchors: int = setting(4, "anchors per step", check=">=1")
    positives: int = setting(3, "positives per anchor", check=">=1")
    negatives: int = setting(3, "negatives per anchor (real ParaDetox and ToxiGen texts, so lengths are "
                                "ragged)", check=">=1")
    max_length: int = setting(128, "tokens per text, at most", check=">=1")
    lora_r: int = setting(16, "LoRA rank (q/k/v/o)", check=">=1")
    dtype: str = setting("auto", "auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass (less memory, more "
                                                  "time)")
    load_in_4bit: bool = setting(False, "QLoRA: the base model in 4-bit NF4 through bitsandbytes (shape default, or "
                                        "a random shape quantized as it loads)")
    repeats: int = setting(10, "timed steps per path", check=">=1")
    warmup: int = setting(2, "untimed steps per path first", check=">=0")
    seed: int = setting(0, "seed of the weights and of the text sample")

    def __post_init__(self) -> None:
        check_settings(self)
        require(self.shape == "default" or self.shape in SHAPES, "shape",
                f"must be 'default' or one of {sorted(SHAPES)}, got {self.shape!r}")
        require(self.dtype in ("auto", "float32", "bfloat16"), "dtype", "must be auto, float32 or bfloat16")


def build_model(config: BenchConfig, device: torch.device):
    """The benchmarked causal LM with a LoRA adapter on q/k/v/o, and the (SmolLM2) tokenizer for real texts."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from cpwb.engine.assets import load_causal_lm, load_tokenizer

    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
    torch.manual_seed(config.seed)
    if config.shape == "default":
        model = load_causal_lm("default", device=str(device), dtype=str(dtype).removeprefix("torch."),
                               load_in_4bit=config.load_in_4bit)
    else:
        class_name, fields = SHAPES[config.shape]
        arch = getattr(transformers, class_name)(**fields, attn_implementation="sdpa")
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(arch, dtype=dtype)
        if config.load_in_4bit:
            model = _quantized(model, dtype)
    if config.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"], task_type="CAUSAL_LM")
    return get_peft_model(model, lora), load_tokenizer("default")


def _quantized(model, dtype: torch.dtype):
    """A random-weight model with its linear layers replaced by 4-bit NF4 ones (bitsandbytes), as QLoRA loads a
    checkpoint: there are no weights on disk to quantize while loading."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=dtype, quant_type="nf4")
                quantized.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                setattr(module, child_name, quantized.to(child.weight.device))
    return model


def real_texts(seed: int) -> list[str]:
    """ParaDetox toxic and neutral sentences and ToxiGen statements: realistic ragged lengths."""
    from cpwb.data.corpora import load_paradetox, load_toxigen_seeds

    texts = [t for p in load_paradetox(limit=3000) for t in (p.toxic, *p.neutrals)]
    texts += [s.text for s in load_toxigen_seeds()]
    random.Random(seed).shuffle(texts)
    return texts


def anchor_batches(config: BenchConfig, tokenizer, vocab_size: int, count: int) -> list[TokenBatch]:
    """`count` batches of anchors x (positives + negatives) real texts, token ids folded into the model's vocab."""
    texts = real_texts(config.seed)
    per_batch = config.anchors * (config.positives + config.negatives)
    batches = []
    for i in range(count):
        chunk = texts[i * per_batch:(i + 1) * per_batch]
        batch = encode(tokenizer, chunk, max_length=config.max_length)
        batches.append(TokenBatch(batch.input_ids % vocab_size, batch.attention_mask, batch.target_mask))
    return batches


def naive_phi(model, batch: TokenBatch, logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-sequence mean NLL from full logits of the padded batch, fp32 by default (the released code's way)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.to(logits_dtype)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
    mask = batch.target_mask[:, 1:]
    return (nll * mask).sum(-1) / mask.sum(-1)


def cpwb_phi(model, batch: TokenBatch) -> torch.Tensor:
    """Per-sequence mean NLL through the trainer's engine (packed, head on scored positions only)."""
    return sequence_nll(model, batch, packed=True).phi


PHI: dict[str, Callable[[torch.nn.Module, TokenBatch], torch.Tensor]] = {"naive": naive_phi, "cpwb": cpwb_phi}


def cp_step(model, optimizer, batch: TokenBatch, phi_fn, config: BenchConfig) -> None:
    """One CP training step: phi of every text, the default CP loss, backward and an optimizer step."""
    phi = phi_fn(model, batch).view(config.anchors, config.positives + config.negatives)
    pos, neg = phi[:, :config.positives], phi[:, config.positives:]
    out = losses.cp_loss(pos, torch.ones_like(pos, dtype=torch.bool), neg, torch.ones_like(neg, dtype=torch.bool))
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class PathResult:
    """Measured figures of one path."""

    path: str
    step_seconds: list[float]
    real_tokens_per_step: float
    peak_memory_gib: float | None

    @property
    def tokens_per_s(self) -> list[float]:
        return [self.real_tokens_per_step / s for s in self.step_seconds]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(config: BenchConfig, device: torch.device | None = None, progress: bool = True) -> dict[str, PathResult]:
    """Time both paths, alternating on the same batches; CUDA peak memory is measured per path."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = build_model(config, device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    vocab = model.get_output_embeddings().weight.shape[0]
    batches = [b.to(device) for b in anchor_batches(config, tokenizer, vocab, config.warmup + config.repeats)]
    real = [float(b.attention_mask.sum()) for b in batches[config.warmup:]]
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    peaks: dict[str, float | None] = {p: None for p in PATHS}
    for i, batch in enumerate(tqdm(batches, desc=f"CP step {config.shape}", disable=not progress)):
        for path in (PATHS if i % 2 == 0 else PATHS[::-1]):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            cp_step(model, optimizer, batch, PHI[path], config)
            _sync(device)
            if i >= config.warmup:
                times[path].append(time.perf_counter() - start)
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device) / 2**30
                    peaks[path] = max(peaks[path] or 0.0, peak)
    mean_real = statistics.mean(real)
    return {p: PathResult(p, times[p], mean_real, peaks[p]) for p in PATHS}


def max_phi_difference(config: BenchConfig, device: torch.device | None = None) -> float:
    """Largest |phi_cpwb - phi_naive float64| over one benchmark batch, in nats (float32 model vs float64 model)."""
    device = device or torch.device("cpu")
    model, tokenizer = build_model(config, device)
    model.eval()
    batch = anchor_batches(config, tokenizer, model.get_output_embeddings().weight.shape[0], 1)[0].to(device)
    with torch.no_grad():
        ours = cpwb_phi(model, batch).double()
        reference = naive_phi(model.double(), batch, logits_dtype=torch.float64)
    return float((ours - reference).abs().max())


def model_flops_per_token(config: BenchConfig) -> float | None:
    """LoRA training FLOPs per token: 4 x parameters (forward 2N, backward through frozen weights 2N)."""
    if config.shape == "default":
        config = BenchConfig(**{**asdict(config), "shape": "smollm2-135m"})
    class_name, fields = SHAPES[config.shape]
    import transformers

    arch = getattr(transformers, class_name)(**fields)
    h, layers, inter, vocab = arch.hidden_size, arch.num_hidden_layers, arch.intermediate_size, arch.vocab_size
    kv = h * arch.num_key_value_heads // arch.num_attention_heads
    params = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + vocab * h
    return 4.0 * params


def report(config: BenchConfig, results: dict[str, PathResult], peak_tflops: float | None,
           phi_difference: float | None = None, write: bool = True, path: str | Path | None = None) -> list[str]:
    """Lines of figures per path and the cpwb/naive ratios; appends rows to `path` (benchmarks/results.csv)."""
    from cpwb.app.bench_results import RESULTS
    from cpwb.app.bench_results import append_result as append_row

    def append_result(*args) -> None:
        append_row(*args, path=path or RESULTS)

    lines = []
    flops = model_flops_per_token(config)
    for name, result in results.items():
        row_config = {**asdict(config), "path": name}
        p50_step = statistics.median(result.step_seconds)
        tps = statistics.median(result.tokens_per_s)
        line = f"{name:>5}: {p50_step * 1000:8.1f} ms/step  {tps:9.0f} real tokens/s"
        if write:
            append_result("train_step", row_config, "step_time", "s", result.step_seconds)
            append_result("train_step", row_config, "real_tokens_per_s", "tokens/s", result.tokens_per_s)
        if result.peak_memory_gib is not None:
            line += f"  peak {result.peak_memory_gib:6.2f} GiB"
            if write:
                append_result("train_step", row_config, "peak_memory", "GiB", [result.peak_memory_gib])
        if peak_tflops:
            mfu = [flops * t / (peak_tflops * 1e12) for t in result.tokens_per_s]
            line += f"  MFU {statistics.median(mfu):.1%}"
            if write:
                append_result("train_step", row_config, "mfu", "fraction", mfu)
        lines.append(line)
    naive, ours = results["naive"], results["cpwb"]
    speedup = statistics.median(ours.tokens_per_s) / statistics.median(naive.tokens_per_s)
    ratio = f"cpwb/naive: tokens/s x{speedup:.2f}"
    if write:
        append_result("train_step", asdict(config), "speedup_cpwb_over_naive", "x", [speedup])
    if ours.peak_memory_gib and naive.peak_memory_gib:
        ratio += f", peak memory x{ours.peak_memory_gib / naive.peak_memory_gib:.2f}"
    lines.append(ratio)
    if phi_difference is not None:
        lines.append(f"max |phi_cpwb - phi_naive_float64| = {phi_difference:.2e} nats")
        if write:
            append_result("train_step", asdict(config), "max_phi_difference", "nats", [phi_difference])
    lines.append(f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return lines


def main(argv: list[str] | None = None) -> int:
    """`cpwb bench`: measure both paths and print the figures and ratios."""
    parser = argparse.ArgumentParser(prog="cpwb bench", description=__doc__.splitlines()[0])
    for field in fields(BenchConfig):
        kind, default, what = type(field.default), field.default, field.metadata["help"]
        if kind is bool:
            parser.add_argument(f"--{field.name.replace('_', '-')}", action="store_true", help=what)
        else:
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=default,
                                help=f"{what} (default {default})")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="accelerator peak for MFU (790 on the H100s measured here, bf16)")
    parser.add_argument("--check-nll", action="store_true", help="also compare phi with a float64 naive reference")
    parser.add_argument("--no-write", action="store_true", help="print only, do not append to results.csv")
    args = vars(parser.parse_args(argv))
    peak, check, write = args.pop("peak_tflops"), args.pop("check_nll"), not args.pop("no_write")
    config = BenchConfig(**args)
    results = run(config)
    difference = max_phi_difference(config) if check else None
    print("\n".join(report(config, results, peak, difference, write=write)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
