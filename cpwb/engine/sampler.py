"""KV-cached decoding of batches of prompts: shared prompt prefixes computed once, finished rows leave the batch.

Written here rather than taken from `model.generate` because, at CPU scale, generate()'s own costs dominate: it
recomputes a shared few-shot prefix for every row, keeps decoding rows that have finished, and spends per step on
logits processors, stopping criteria and input preparation that a plain loop does not need
(`benchmarks/generation_throughput.py` measures both side by side). Greedy decoding gives generate()'s tokens.

Rows are laid out [shared prefix][padding][own tail] with position ids from the attention mask, which gives the same
tokens as left-padded prompts alone; the prefix runs once and its cache is broadcast, each prompt's tail runs once
and is broadcast to its k samples.

Sampling draws from transformers' warped distribution (temperature, top-k, top-p) without sorting the vocabulary:
`nucleus_sample` keeps the same tokens as its warpers from the top `CANDIDATES` logits whenever those hold the
nucleus, and takes the warpers' full path for the rows where they do not. The sort was over half of the time of
RealToxicityPrompts-style sampling (k = 25, top-p 0.9; `benchmarks/generation_throughput.py`).
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from cpwb.engine.device import eval_mode, pad_token_id


def cache_argument(model) -> str:
    """The keyword a model's forward takes its key/value cache by: `cache` (transformers 5.x), else the older
    `past_key_values` (deprecated in 5.x, the only one before)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix common to every row, leaving each row at least one token of its own."""
    limit = min(len(row) for row in rows) - 1
    length = 0
    while length < limit and all(row[length] == rows[0][length] for row in rows):
        length += 1
    return length


def end_token_ids(model, tokenizer) -> torch.Tensor:
    """The token ids that end a continuation: the tokenizer's end of sequence and the model's generation config's."""
    eos = model.generation_config.eos_token_id
    return torch.tensor(sorted({tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}))


def _warpers(temperature: float, top_p: float, top_k: int):
    """transformers' sampling warpers: temperature, then top-k and top-p when they cut anything."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    return LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                               + ([TopKLogitsWarper(top_k)] if top_k > 0 else [])
                               + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))


CANDIDATES = (256, 4096)  # widths nucleus_sample looks at in turn; rows whose nucleus is wider take the full path


def nucleus_sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, warpers,
                   generator: torch.Generator | None, candidates: Sequence[int] = CANDIDATES) -> torch.Tensor:
    """One token per row from softmax(warpers(logits)): the distribution after temperature, top-k and top-p.

    transformers' TopPLogitsWarper keeps a token when the probability of the tokens above it is below top_p. If the
    top w tokens hold at least top_p (or top-k cuts to at most w), no token outside them is kept, so the kept set is
    found among them: their probabilities against the whole vocabulary's log-sum-exp, an exclusive cumulative sum,
    one draw among the kept. Rows try each width of `candidates` in turn (SmolLM2-135M on RTP prompts, top-p 0.9:
    256 holds the nucleus of 69% of rows, 4096 of 99.8%); the rest go through the warpers and a full-width draw.
    The distribution is the warpers' exactly; the random stream differs from one full-width draw per row.
    """
    scores = logits / temperature
    cut = 0 < top_k <= candidates[-1]
    if top_p >= 1 and not cut:
        return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
    out = torch.empty(len(scores), dtype=torch.long, device=scores.device)
    rows = torch.arange(len(scores), device=scores.device)
    total = None if cut else torch.logsumexp(scores, dim=-1, keepdim=True)
    for width in (top_k,) if cut else candidates:
        values, tokens = scores[rows].topk(min(width, scores.shape[-1]), dim=-1)
        probabilities = torch.exp(values - (torch.logsumexp(values, dim=-1, keepdim=True) if cut else total[rows]))
        above = probabilities.cumsum(-1) - probabilities
        kept = probabilities if top_p >= 1 else torch.where(above < top_p, probabilities, 0.0)
        held = torch.ones_like(rows, dtype=torch.bool) if cut else probabilities.sum(-1) >= top_p
        picks = torch.multinomial(kept[held], 1, generator=generator)
        out[rows[held]] = tokens[held].gather(1, picks).squeeze(1)
        rows = rows[~held]
        if not len(rows):
            return out
    full = torch.softmax(warpers(None, logits[rows]), dim=-1)
    out[rows] = torch.multinomial(full, 1, generator=generator).squeeze(1)
    return out


class Decoder:
    """Greedy or sampled continuations of token-id rows under one model, `k` per row."""

    def __init__(self, model, tokenizer, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.cache_arg = cache_argument(model)
        self.pad_id = pad_token_id(tokenizer)
        self.eos_ids = end_token_ids(model, tokenizer)
        self.warpers = _warpers(temperature, top_p, top_k)
        self.sampling = (temperature, top_p, top_k)

    def _layout(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Token ids and attention mask [B, T] of the rows as [prefix][pad][tail], and the prefix length."""
        common = shared_prefix_length(rows)
        width = max(len(row) for row in rows) - common
        ids = torch.full((len(rows), common + width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        ids[:, :common], mask[:, :common] = torch.tensor(list(rows[0][:common]), dtype=torch.long), 1
        for i, row in enumerate(rows):
            tail = list(row[common:])
            ids[i, ids.shape[1] - len(tail):], mask[i, ids.shape[1] - len(tail):] = torch.tensor(tail), 1
        return ids, mask, common

    def _forward(self, **kwargs: Any) -> torch.Tensor:
        """Last-position logits (float32) of one forward pass that extends the cache."""
        return self.model(use_cache=True, logits_to_keep=1, **kwargs).logits[:, -1].float()

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, common: int, k: int):
        """The key/value cache of the prompts, each repeated k times, and the next-token logits of every row."""
        from transformers import DynamicCache

        new_cache = getattr(self.model, "new_cache", None)  # a model combining several passes keeps one cache each
        cache = new_cache() if new_cache is not None else DynamicCache(config=self.model.config)
        if common:
            self.model(input_ids=ids[:1, :common], **{self.cache_arg: cache}, use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(ids.shape[0])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(input_ids=ids[:, common:], attention_mask=mask, position_ids=positions[:, common:],
                               **{self.cache_arg: cache})
        cache.batch_repeat_interleave(k)
        return cache, logits.repeat_interleave(k, 0)

    def _next(self, logits: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> torch.Tensor:
        """The next token of every row: the most likely, or a sample from the warped distribution."""
        if not do_sample:
            return logits.argmax(-1)
        return nucleus_sample(logits, *self.sampling, self.warpers, generator)

    @torch.no_grad()
    def decode(self, rows: Sequence[Sequence[int]], k: int, max_new_tokens: int, do_sample: bool = True,
               seed: int = 0) -> list[list[str]]:
        """For each row (token ids), k continuations as text (special tokens skipped); sampling is reproducible for
        the same rows, k, seed and length."""
        ids, mask, common = self._layout(rows)
        device = next(self.model.parameters()).device
        ids, mask, eos_ids = ids.to(device), mask.to(device), self.eos_ids.to(device)
        generator = torch.Generator(device=device).manual_seed(seed) if do_sample else None
        with eval_mode(self.model):
            cache, logits = self._prefill(ids, mask, common, k)
            mask = mask.repeat_interleave(k, 0)
            out = torch.full((mask.shape[0], max_new_tokens), self.pad_id, dtype=torch.long, device=device)
            active = torch.arange(mask.shape[0], device=device)
            for step in range(max_new_tokens):
                tokens = self._next(logits, do_sample, generator)
                out[active, step] = tokens
                writing = ~torch.isin(tokens, eos_ids)
                if step == max_new_tokens - 1 or not writing.any():
                    break
                if not writing.all():  # finished rows leave the batch and the cache
                    keep = writing.nonzero().squeeze(1)
                    cache.batch_select_indices(keep)
                    active, mask, tokens = active[keep], mask[keep], tokens[keep]
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                logits = self._forward(input_ids=tokens[:, None], attention_mask=mask,
                                       position_ids=mask.sum(-1, keepdim=True) - 1, **{self.cache_arg: cache})
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [texts[i * k:(i + 1) * k] for i in range(len(rows))]


class Generator(Protocol):
    """Samples k continuations of each chat prompt given as token ids (hard-negative generation)."""

    name: str
    tokenizer: Any

    def sample(self, rows: Sequence[Sequence[int]], k: int, seed: int, max_new_tokens: int) -> list[list[str]]:
        """For each prompt, k sampled continuations as text (special tokens skipped)."""
        ...


class TransformersGenerator(Decoder):
    """The hard-negative generator on transformers: `Decoder` sampling under a name for provenance."""

    def __init__(self, model, tokenizer, name: str, temperature: float = 0.8, top_p: float = 0.95,
                 top_k: int = 0) -> None:
        super().__init__(model, tokenizer, temperature, top_p, top_k)
        self.name = name

    def sample(self, rows: Sequence[Sequence[int]], k: int, seed: int, max_new_tokens: int) -> list[list[str]]:
        """For each prompt (token ids), k samples; reproducible for the same rows, k, seed and length."""
        return self.decode(rows, k, max_new_tokens, do_sample=True, seed=seed)
