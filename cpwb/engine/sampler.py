"""Batched sampling with a key/value cache: shared prompt prefixes computed once, finished rows leave the batch.

Written here rather than taken from `model.generate` because generate() recomputes a shared few-shot prefix for
every row and keeps decoding rows that have finished; at CPU scale those two costs dominate (see
benchmarks/generation_throughput.py)."""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from cpwb.engine.device import eval_mode, pad_token_id


class Generator(Protocol):
    """Samples k continuations of each chat prompt given as token ids."""

    name: str
    tokenizer: Any

    def sample(self, rows: Sequence[Sequence[int]], k: int, seed: int, max_new_tokens: int) -> list[list[str]]:
        """For each prompt, k sampled continuations as text (special tokens skipped)."""
        ...


def cache_argument(model) -> str:
    """The keyword a model's forward takes its key/value cache by: `cache` (transformers 5.x), else the older
    `past_key_values` (deprecated in 5.x, the only one before)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix common to every row, leaving each row at least one token of its own."""
    limit = min(len(row) for row in rows) - 1
    length = 0
    while length < limit and all(row[length] == rows[0][length] for row in rows):
        length += 1
    return length


class TransformersGenerator:
    """Batched sampling with transformers: shared prompt prefixes computed once, finished rows leave the batch.

    The prompts' common prefix (system message and few-shot examples) is run once and its key/value cache
    broadcast; each prompt's own tail is run once and broadcast to its k samples. Decoding then drops every row
    that has emitted its end token, so the work per step follows the rows still writing (a synchronous batch
    keeps computing finished rows until the longest is done). Rows are laid out [prefix][padding][own tail] with
    position ids from the attention mask, which gives the same tokens as left-padded prompts alone.
    """

    def __init__(self, model, tokenizer, name: str, temperature: float = 0.8, top_p: float = 0.95,
                 top_k: int = 0) -> None:
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.cache_arg = cache_argument(model)
        self.pad_id = pad_token_id(tokenizer)
        eos = model.generation_config.eos_token_id
        self.eos_ids = torch.tensor(sorted({tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
                                           - {None}))
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                           + ([TopKLogitsWarper(top_k)] if top_k > 0 else [])
                                           + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))

    def _layout(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Token ids and attention mask [B, T] of the rows as [prefix][pad][tail], and the prefix length."""
        common = _shared_prefix_length(rows)
        width = max(len(row) for row in rows) - common
        ids = torch.full((len(rows), common + width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        ids[:, :common], mask[:, :common] = torch.tensor(list(rows[0][:common]), dtype=torch.long), 1
        for i, row in enumerate(rows):
            tail = list(row[common:])
            ids[i, ids.shape[1] - len(tail):], mask[i, ids.shape[1] - len(tail):] = torch.tensor(tail), 1
        return ids, mask, common

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, common: int, k: int):
        """The key/value cache of the prompts, each repeated k times, and the next-token logits of every row."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if common:
            self.model(input_ids=ids[:1, :common], **{self.cache_arg: cache}, use_cache=True)
            cache.batch_repeat_interleave(ids.shape[0])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids[:, common:], attention_mask=mask, position_ids=positions[:, common:],
                            **{self.cache_arg: cache}, use_cache=True, logits_to_keep=1).logits[:, -1]
        cache.batch_repeat_interleave(k)
        return cache, logits.float().repeat_interleave(k, 0)

    @torch.no_grad()
    def sample(self, rows: Sequence[Sequence[int]], k: int, seed: int, max_new_tokens: int) -> list[list[str]]:
        """For each prompt (token ids), k samples; reproducible for the same rows, k, seed and length."""
        ids, mask, common = self._layout(rows)
        device = next(self.model.parameters()).device
        ids, mask, eos_ids = ids.to(device), mask.to(device), self.eos_ids.to(device)
        with eval_mode(self.model):
            cache, logits = self._prefill(ids, mask, common, k)
            mask = mask.repeat_interleave(k, 0)
            out = torch.full((mask.shape[0], max_new_tokens), self.pad_id, dtype=torch.long, device=device)
            active = torch.arange(mask.shape[0], device=device)
            generator = torch.Generator(device=device).manual_seed(seed)
            for step in range(max_new_tokens):
                probabilities = torch.softmax(self.warpers(None, logits), dim=-1)
                tokens = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
                out[active, step] = tokens
                writing = ~torch.isin(tokens, eos_ids)
                if step == max_new_tokens - 1 or not writing.any():
                    break
                if not writing.all():  # finished rows leave the batch and the cache
                    keep = writing.nonzero().squeeze(1)
                    cache.batch_select_indices(keep)
                    active, mask, tokens = active[keep], mask[keep], tokens[keep]
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                logits = self.model(input_ids=tokens[:, None], attention_mask=mask,
                                    position_ids=mask.sum(-1, keepdim=True) - 1, **{self.cache_arg: cache},
                                    use_cache=True).logits[:, -1].float()
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [texts[i * k:(i + 1) * k] for i in range(len(rows))]
