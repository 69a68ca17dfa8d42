"""Batched continuation of prompts: left-padded, length-bucketed, seeded, optionally through the chat template.

What is deterministic: greedy decoding gives the same continuations whatever `batch_size` (left padding with
position ids from the attention mask; at most float-level ties can differ). Sampling is reproducible for the
same prompts, `seed` and `batch_size`: batch b (in length order) runs after torch.manual_seed(seed + b), so a
prompt's samples depend on the prompts it is batched with, but never on what ran before the call.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from cpwb.core.errors import InputError
from cpwb.engine.device import eval_mode, pad_token_id
from cpwb.engine.nll import length_buckets, start_token_id
from cpwb.engine.sampler import Decoder


def chat_messages(prompt: str, system: str | None = None,
                  examples: Sequence[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """The chat turns for one prompt: optional system message, few-shot (user, assistant) pairs, then the prompt."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, assistant in examples:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages + [{"role": "user", "content": prompt}]


def prompt_ids(tokenizer, prompt: str, chat: bool = False, system: str | None = None,
               examples: Sequence[tuple[str, str]] = ()) -> list[int]:
    """Token ids a continuation is generated from: the chat-formatted prompt, or the start token plus the prompt.

    Plain prompts get the same start token as scored texts (`cpwb.engine.nll.start_token_id`), so generation and
    likelihood see a prompt the same way.
    """
    if chat:
        text = tokenizer.apply_chat_template(chat_messages(prompt, system, examples), tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    start = start_token_id(tokenizer)
    ids = tokenizer(prompt, add_special_tokens=start is None)["input_ids"]
    return ids if start is None else [start, *ids]


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input ids and attention mask of token-id rows."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention[i, width - len(row):] = 1
    return input_ids, attention


def _sampling_kwargs(do_sample: bool, top_p: float, temperature: float, top_k: int) -> dict:
    """model.generate arguments of the decoding mode (greedy passes no sampling knobs, so none is warned about)."""
    if not do_sample:
        return {"do_sample": False}
    if temperature <= 0 or not 0 < top_p <= 1 or top_k < 0:
        raise InputError(f"need temperature > 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}",
                         field="sampling")
    return {"do_sample": True, "top_p": top_p, "temperature": temperature, "top_k": top_k}


def _checked(prompts: Sequence[str], max_new_tokens: int, do_sample: bool, num_return_sequences: int,
             batch_size: int, temperature: float, top_p: float, top_k: int) -> dict:
    """Refuse impossible requests with one line naming the setting; the decoding arguments of model.generate."""
    if isinstance(prompts, str):
        raise InputError("expected a sequence of prompts, got a single string", field="prompts")
    if batch_size < 1 or num_return_sequences < 1 or max_new_tokens < 1:
        raise InputError("batch_size, num_return_sequences and max_new_tokens must be >= 1", field="generate")
    decoding = _sampling_kwargs(do_sample, top_p, temperature, top_k)
    if not do_sample and num_return_sequences > 1:
        raise InputError("greedy decoding returns one continuation per prompt; set do_sample=True",
                         field="num_return_sequences")
    return decoding


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 20, do_sample: bool = False,
             top_p: float = 0.9, temperature: float = 1.0, top_k: int = 0, num_return_sequences: int = 1,
             seed: int = 0, batch_size: int = 16, chat: bool = False, system: str | None = None,
             examples: Sequence[tuple[str, str]] = (), progress: bool = False) -> list[list[str]]:
    """For each prompt, its `num_return_sequences` continuations (prompt excluded, special tokens skipped).

    Prompts are decoded `batch_size` at a time (each expanding to num_return_sequences rows), in length buckets,
    by cpwb.engine.sampler's KV-cached loop: greedy gives model.generate's tokens (`generate_with_transformers`),
    faster. Sampling is seeded per bucket (seed + its index). top_k 0 means no top-k cut. `chat` wraps each prompt
    in the chat template (optional system message and few-shot `examples`). Works for peft-wrapped models; the
    model's train/eval mode is restored afterwards.
    """
    _checked(prompts, max_new_tokens, do_sample, num_return_sequences, batch_size, temperature, top_p, top_k)
    rows = [prompt_ids(tokenizer, p, chat, system, examples) for p in prompts]
    decoder = Decoder(model, tokenizer, temperature, top_p, top_k)
    out: list[list[str]] = [[] for _ in prompts]
    for b, idx in enumerate(tqdm(length_buckets([len(r) for r in rows], batch_size), desc="generate",
                                 disable=not progress)):
        texts = decoder.decode([rows[i] for i in idx], num_return_sequences, max_new_tokens, do_sample, seed + b)
        for row, i in enumerate(idx):
            out[i] = texts[row]
    return out


@torch.no_grad()
def generate_with_transformers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 20,
                               do_sample: bool = False, top_p: float = 0.9, temperature: float = 1.0, top_k: int = 0,
                               num_return_sequences: int = 1, seed: int = 0, batch_size: int = 16,
                               chat: bool = False, system: str | None = None,
                               examples: Sequence[tuple[str, str]] = (), progress: bool = False) -> list[list[str]]:
    """`generate` through transformers' `model.generate` on left-padded batches: the reference the benchmark and the
    tests hold the fast path to (same prompts, buckets and greedy tokens)."""
    decoding = _checked(prompts, max_new_tokens, do_sample, num_return_sequences, batch_size, temperature, top_p,
                        top_k)
    rows = [prompt_ids(tokenizer, p, chat, system, examples) for p in prompts]
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    out: list[list[str]] = [[] for _ in prompts]
    with eval_mode(model):
        for b, idx in enumerate(tqdm(length_buckets([len(r) for r in rows], batch_size), desc="generate",
                                     disable=not progress)):
            input_ids, attention = _left_pad([rows[i] for i in idx], pad_id)
            torch.manual_seed(seed + b)
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                       max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                                       pad_token_id=pad_id, **decoding)
            texts = tokenizer.batch_decode(generated[:, input_ids.shape[1]:], skip_special_tokens=True)
            for row, i in enumerate(idx):
                out[i] = texts[row * num_return_sequences:(row + 1) * num_return_sequences]
    return out
