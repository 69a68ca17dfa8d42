"""Jobs that the reliability tests kill with SIGKILL: each runs real cpwb code and hangs at a chosen point.

`python -m tests.reliability.driver SCENARIO 'JSON ARGS'`. A job writes the file `marker` when it reaches its
hang point and then sleeps until it is killed, so the test kills it at a known place without timing anything.
Scenarios: train, generate, convert, write_pairs, load (the last one measures memory and exits normally).
"""
from __future__ import annotations

import json
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

HANG_S = 3600


def hang(marker: str | Path, per_rank: bool = False) -> None:
    """Say where we are, then wait to be killed. `per_rank`: each process of a launcher writes `marker.RANK`
    holding its process id (so a test can kill one rank)."""
    if per_rank:
        Path(f"{marker}.{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
    else:
        Path(marker).write_text("reached\n")
    time.sleep(HANG_S)
    raise SystemExit("hang point was never killed")


# ------------------------------------------------------------------------------------------------ training


def train_job(args: dict[str, Any]) -> None:
    """Train with TrainConfig settings; hang in the first step after checkpoint `hang_after_checkpoint`, in the
    `hang_at_call`-th forward pass, or while checkpoint `hang_writing_checkpoint` is being written (its trainer state
    half on disk)."""
    import torch

    import cpwb.steps.training.trainer as trainer
    from cpwb.core.config import from_dict

    config = from_dict(trainer.TrainConfig, args["settings"])
    run_dir = Path(config.output_dir)
    if "hang_after_checkpoint" in args:
        wanted = f"step-{args['hang_after_checkpoint']:06d}"
        real_loss = trainer.objective_loss

        def loss_then_hang(*a, **k):
            last = trainer.latest_checkpoint(run_dir)
            if last is not None and last.name == wanted:
                hang(args["marker"])
            return real_loss(*a, **k)

        trainer.objective_loss = loss_then_hang
    if "hang_at_call" in args:  # every process hangs in its N-th forward pass (a launcher's ranks alike)
        calls, real_objective = [0], trainer.objective_loss

        def count_then_hang(*a, **k):
            calls[0] += 1
            if calls[0] == args["hang_at_call"]:
                hang(args["marker"], args.get("marker_per_rank", False))
            return real_objective(*a, **k)

        trainer.objective_loss = count_then_hang
    if "hang_writing_checkpoint" in args:
        wanted = f"step-{args['hang_writing_checkpoint']:06d}"
        real_save = torch.save

        def half_save_then_hang(obj, path, *a, **k):
            real_save(obj, path, *a, **k)
            if Path(path).parent.name == wanted:
                data = Path(path).read_bytes()
                Path(path).write_bytes(data[:len(data) // 2])
                hang(args["marker"])

        torch.save = half_save_then_hang
    trainer.train(config, resume=args.get("resume", False))


# ------------------------------------------------------------------------------------------------ generation


class CrcScorer:
    """Deterministic stand-in toxicity scorer: a pseudo-random score per text (filters pass some, fail some)."""

    name = "crc"

    def score(self, texts, batch_size: int = 256, progress: bool = False) -> np.ndarray:
        return np.array([zlib.crc32(t.encode()) % 1000 / 1000 for t in texts])


class HashEmbedder:
    """Deterministic stand-in sentence embedder: a unit vector seeded by each text (no model to load)."""

    def embed(self, texts, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        vectors = np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(16) for t in texts])
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def tiny_generation_models(model_dir: str | Path):
    """Generator and target: the tiny Llama saved in `model_dir`; stand-in scorers. The same in every process."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cpwb.engine.sampler import TransformersGenerator
    from cpwb.steps.negatives.run import GenerationModels

    model = LlamaForCausalLM.from_pretrained(str(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    generator = TransformersGenerator(model, tokenizer, "tiny-llama", temperature=1.0, top_p=1.0)
    return GenerationModels(generator, model, tokenizer, CrcScorer(), HashEmbedder())


GENERATION_SETTINGS = dict(n_anchors=8, paraphrases_per_anchor=2, n_examples=2, max_new_tokens=8, batch_size=2,
                           t_pos=0.45, t_neg=0.55, s_min=-1.0, min_edit=0.0, length_ratio_min=0.01,
                           length_ratio_max=50.0, delta=50.0, n_positives=1, n_negatives=1, progress=False)


def generation_config(output_dir: str | Path):
    """The small generation run of the tests: 8 ParaDetox anchors in chunks of 2."""
    from cpwb.core.config import from_dict
    from cpwb.steps.negatives.config import GenerateConfig

    return from_dict(GenerateConfig, {**GENERATION_SETTINGS, "output_dir": str(output_dir)})


def generate_job(args: dict[str, Any]) -> None:
    """Generate hard negatives; hang after `hang_after_anchors` anchors, or half-way through appending a pair line."""
    import cpwb.data.pairs
    from cpwb.steps.negatives.run import run_generation

    on_anchor = None
    if "hang_after_anchors" in args:
        seen = []

        def on_anchor(record):
            seen.append(record["id"])
            if len(seen) == args["hang_after_anchors"]:
                hang(args["marker"])

    if args.get("tear_pair_line"):
        def torn_append(path, record):
            line = json.dumps(record, sort_keys=True).encode() + b"\n"
            with open(path, "ab") as handle:
                handle.write(line[:len(line) // 2])
            hang(args["marker"])

        cpwb.data.pairs.append_jsonl = torn_append
    run_generation(generation_config(args["output_dir"]), tiny_generation_models(args["model_dir"]),
                   on_anchor=on_anchor)


# ------------------------------------------------------------------------------------------------ files


def convert_job(args: dict[str, Any]) -> None:
    """An asset conversion whose build writes half of its weights and hangs."""
    from cpwb.engine.assets import cached_conversion

    def slow_build(out: Path) -> None:
        (out / "weights.bin").write_bytes(b"half of the wei")
        hang(args["marker"])

    cached_conversion(args["name"], Path(args["source"]), slow_build)


def write_pairs_job(args: dict[str, Any]) -> None:
    """write_pairs over a stream of records that stops (hangs) after `n` records, as a long export would."""
    from cpwb.data.pairs import PairRecord, PairText, write_pairs

    def records():
        for i in range(args["n"]):
            yield PairRecord(f"r{i}", f"anchor {i}", (PairText(f"pos {i}", "human"),), (PairText(f"neg {i}", "human"),))
        hang(args["marker"])

    write_pairs(args["path"], records())


# ------------------------------------------------------------------------------------------------ load


def _memory_kib() -> dict[str, int]:
    """Current and peak resident set size of this process (KiB), from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def load_job(args: dict[str, Any]) -> None:
    """Score or compute NLL for `n` texts with progress; write RSS before and the peak during the work (KiB)."""
    from cpwb.data.corpora import load_paradetox

    texts = [t for row in load_paradetox() for t in (row.toxic, *row.neutrals)]
    texts = (texts * (args["n"] // len(texts) + 1))[:args["n"]]
    if args["what"] == "score":
        from cpwb.engine.scoring import load_toxicity_scorer

        scorer = load_toxicity_scorer()
        work = lambda: scorer.score(texts, progress=True)  # noqa: E731
    else:
        from cpwb.engine.assets import load_causal_lm, load_tokenizer
        from cpwb.engine.nll import texts_nll

        model, tokenizer = load_causal_lm(args["model"]), load_tokenizer(args["model"])
        work = lambda: texts_nll(model, tokenizer, texts, batch_size=16, max_length=64, progress=True).phi  # noqa: E731
    with open("/proc/self/clear_refs", "w") as handle:  # reset the peak (VmHWM) to the current RSS
        handle.write("5")
    before = _memory_kib()["VmRSS"]
    started = time.perf_counter()
    values = work()
    seconds = time.perf_counter() - started
    Path(args["result"]).write_text(json.dumps({
        "n": len(texts), "rss_before_kib": before, "peak_kib": _memory_kib()["VmHWM"], "seconds": seconds,
        "finite": bool(np.isfinite(values).all())}))


SCENARIOS = {"train": train_job, "generate": generate_job, "convert": convert_job, "write_pairs": write_pairs_job,
             "load": load_job}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](json.loads(sys.argv[2]))
