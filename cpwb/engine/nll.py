"""Per-sequence negative log-likelihood: the one engine behind training, evaluation, plots and filters.

phi(x) = mean NLL over the scored tokens of x (log-perplexity). The LM head is applied only to positions whose
next token is scored (padding never reaches it), in chunks, so full-vocabulary fp32 logits for a whole batch are
never materialised; under autograd each chunk is recomputed in the backward pass (activation checkpointing), so
memory stays bounded for 128k vocabularies too. Position ids come from the attention mask, so left and right
padding give the same values as the text alone. With `packed=True` the real tokens of the whole batch run as one
row (position ids restart per text, so the model's block-causal mask keeps texts apart): no compute on padding.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from cpwb.core.errors import InputError
from cpwb.engine.device import eval_mode, pad_token_id

# Logit elements per LM-head chunk: 2**25 fp32 values = 128 MiB whatever the vocabulary size.
CHUNK_LOGIT_ELEMENTS = 1 << 25


@dataclass
class TokenBatch:
    """Padded token ids with the mask of real tokens and the mask of tokens whose NLL counts."""

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    target_mask: torch.Tensor  # [B, T] bool, True where the token is scored (never the first real token)

    def to(self, device: torch.device | str) -> TokenBatch:
        """The same batch on another device."""
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device))

    def select(self, rows: torch.Tensor) -> TokenBatch:
        """The rows where the bool mask `rows` is True, columns that are padding in all of them dropped."""
        mask = self.attention_mask[rows]
        real = mask.any(0).nonzero().flatten()
        span = slice(int(real[0]), int(real[-1]) + 1) if len(real) else slice(0, 0)
        return TokenBatch(self.input_ids[rows][:, span], mask[:, span], self.target_mask[rows][:, span])


@dataclass
class SequenceNLL:
    """Per-sequence NLL statistics: sum and count of scored tokens and their mean phi (differentiable)."""

    nll_sum: torch.Tensor  # [B]
    n_tokens: torch.Tensor  # [B]
    token_nll: torch.Tensor | None = None  # [B, T], NLL of token t at column t, 0 where not scored
    states: torch.Tensor | None = None  # [N, H] hidden states of the scored tokens (keep_states=True)
    rows: torch.Tensor | None = None  # [N] the sequence of each scored token

    @property
    def phi(self) -> torch.Tensor:
        """Mean token NLL (log-perplexity); NaN for a sequence with no scored token."""
        return self.nll_sum / self.n_tokens


def start_token_id(tokenizer) -> int | None:
    """Token that opens every scored text so its first real token is predicted too (None if the tokenizer adds one).

    Tokenizers without an automatic BOS get the pre-training document separator `<|endoftext|>` when the
    vocabulary has one (SmolLM2, GPT-2, Qwen: a chat marker such as SmolLM2's BOS `<|im_start|>` makes the model
    expect a role name and inflates the first token's NLL), else their BOS, else their EOS.
    """
    probe = tokenizer("a")["input_ids"]
    if tokenizer.bos_token_id is not None and probe and probe[0] == tokenizer.bos_token_id:
        return None
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(separator, int) and tokenizer.convert_ids_to_tokens(separator) == "<|endoftext|>":
        return separator
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer, texts: Sequence[str], contexts: Sequence[str] | None = None, max_length: int = 256,
           padding_side: str = "right") -> TokenBatch:
    """Tokenise texts (optionally each after a context that is conditioned on but not scored) into one batch.

    Every text gets the model's start token unless the tokenizer adds one; texts are truncated to `max_length`
    scored tokens, contexts keep their last `max_length` tokens.
    """
    start = start_token_id(tokenizer)
    rows: list[tuple[list[int], list[int]]] = []
    for i, text in enumerate(texts):
        context_ids = [] if start is None else [start]
        if contexts is not None:
            context_ids += tokenizer(contexts[i], add_special_tokens=start is None)["input_ids"][-max_length:]
        text_ids = tokenizer(text, add_special_tokens=start is None and contexts is None)["input_ids"]
        if contexts is None and start is None:
            context_ids, text_ids = text_ids[:1], text_ids[1:]
        rows.append((context_ids, text_ids[:max_length]))
    width = max(len(c) + len(t) for c, t in rows)
    pad = pad_token_id(tokenizer)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (context_ids, text_ids) in enumerate(rows):
        ids = context_ids + text_ids
        offset = width - len(ids) if padding_side == "left" else 0
        input_ids[i, offset:offset + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, offset:offset + len(ids)] = 1
        target[i, offset + len(context_ids):offset + len(ids)] = True
    return TokenBatch(input_ids, attention, target)


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """The transformer body, the LM head and the logit soft-cap of a (possibly peft-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return base.get_decoder(), base.get_output_embeddings(), softcap


def decoder_layers(model) -> torch.nn.ModuleList:
    """The transformer blocks of a (possibly peft-wrapped) causal LM, in order (what FSDP shards, what the
    training-free interventions hook)."""
    decoder, _, _ = decoder_and_head(model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise InputError(f"cannot find the transformer blocks of {type(decoder).__name__} (no layers/h/blocks list)",
                     field="model")


def _logits(head: torch.nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """fp32 logits of the LM head on `hidden` [N, H], soft-capped when the model does so."""
    logits = head(hidden).float()
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def _chunk_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
               softcap: float | None) -> torch.Tensor:
    """NLL of `targets` under the LM head applied to `hidden` [N, H]."""
    logits = _logits(head, hidden, softcap)
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[:, None]).squeeze(-1)


def _chunk_kl(head: torch.nn.Module, hidden: torch.Tensor, base_hidden: torch.Tensor,
              softcap: float | None) -> torch.Tensor:
    """KL(base || model) of the next-token distributions at each position [N]."""
    log_p = torch.log_softmax(_logits(head, hidden, softcap), -1)
    log_q = torch.log_softmax(_logits(head, base_hidden, softcap), -1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def _over_chunks(fn, head: torch.nn.Module, first: torch.Tensor, second: torch.Tensor, softcap: float | None,
                 chunk_logit_elements: int) -> torch.Tensor:
    """`fn` over row chunks of (first, second); with several chunks each is recomputed in backward, not kept."""
    chunk = max(1, chunk_logit_elements // head.weight.shape[0])
    pieces = []
    for start in range(0, first.shape[0], chunk):
        args = (head, first[start:start + chunk], second[start:start + chunk], softcap)
        if torch.is_grad_enabled() and first.requires_grad and first.shape[0] > chunk:
            pieces.append(checkpoint(fn, *args, use_reentrant=False))
        else:
            pieces.append(fn(*args))
    return torch.cat(pieces) if pieces else first.new_zeros(0, dtype=torch.float32)


def scored_states(model, batch: TokenBatch, packed: bool = False,
                  body_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Final hidden states that predict the scored tokens [N, H], with their (row, column) in the batch.

    `packed` runs the real tokens as one row with per-text position ids and no attention mask, which Hugging Face
    decoders turn into a block-causal mask (see `packing_matches`). `body_dtype` runs the transformer body under
    torch.autocast in that dtype and returns the states in the LM head's dtype, so an fp32 head and the
    log-sum-exp stay in fp32 (benchmarks/perplexity_precision.py measures what bfloat16 costs in accuracy).
    """
    if body_dtype is not None:
        with torch.autocast(batch.input_ids.device.type, dtype=body_dtype):
            states, rows, cols = scored_states(model, batch, packed)
        return states.to(decoder_and_head(model)[1].weight.dtype), rows, cols
    decoder, _, _ = decoder_and_head(model)
    mask = batch.attention_mask
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    # Position t-1 predicts token t: gather only the hidden states whose next token is scored.
    rows, cols = batch.target_mask[:, 1:].nonzero(as_tuple=True)
    if not packed:
        hidden = decoder(input_ids=batch.input_ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state
        return hidden[:, :-1][rows, cols], rows, cols
    real = mask.bool()
    hidden = decoder(input_ids=batch.input_ids[real][None], attention_mask=None,
                     position_ids=position_ids[real][None], use_cache=False).last_hidden_state[0]
    packed_index = torch.cumsum(real.flatten(), 0).view_as(mask) - 1  # column of each real token in the packed row
    return hidden[packed_index[rows, cols]], rows, cols


def sequence_nll(model, batch: TokenBatch, return_token_nll: bool = False, keep_states: bool = False,
                 chunk_logit_elements: int = CHUNK_LOGIT_ELEMENTS, packed: bool = False,
                 body_dtype: torch.dtype | None = None) -> SequenceNLL:
    """Per-sequence NLL of a token batch under `model`; differentiable when grad is enabled.

    `keep_states` keeps the scored hidden states on the result, for a KL term that reuses this forward pass;
    `packed` skips all padding and `body_dtype` autocasts the transformer body (see `scored_states`).
    """
    _, head, softcap = decoder_and_head(model)
    states, rows, cols = scored_states(model, batch, packed=packed, body_dtype=body_dtype)
    targets = batch.input_ids[:, 1:][rows, cols]
    token_values = _over_chunks(_chunk_nll, head, states, targets, softcap, chunk_logit_elements)
    n_seq, device = batch.input_ids.shape[0], states.device
    nll_sum = torch.zeros(n_seq, dtype=torch.float32, device=device).index_add(0, rows, token_values)
    n_tokens = batch.target_mask[:, 1:].sum(-1).to(torch.float32)
    token_nll = None
    if return_token_nll:
        token_nll = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=device)
        token_nll[rows, cols + 1] = token_values
    return SequenceNLL(nll_sum, n_tokens, token_nll, states if keep_states else None, rows)


def sequence_kl(model, stats: SequenceNLL, base_states: torch.Tensor, rows: torch.Tensor | None = None,
                chunk_logit_elements: int = CHUNK_LOGIT_ELEMENTS) -> torch.Tensor:
    """Per-sequence mean token KL(base || model), from states kept by `sequence_nll(keep_states=True)`.

    `base_states` are `scored_states` of the same batch under the frozen base (e.g. a peft adapter disabled), or
    of `batch.select(rows)` when the bool mask `rows` restricts the KL to those sequences (the others get 0): the
    full-vocabulary logits are then computed for their tokens only.
    """
    _, head, softcap = decoder_and_head(model)
    keep = torch.ones_like(stats.rows, dtype=torch.bool) if rows is None else rows[stats.rows]
    token_kl = _over_chunks(_chunk_kl, head, stats.states[keep], base_states, softcap, chunk_logit_elements)
    kl_sum = torch.zeros_like(stats.nll_sum).index_add(0, stats.rows[keep], token_kl)
    return kl_sum / stats.n_tokens


@torch.no_grad()
def packing_matches(model, batch: TokenBatch, atol: float = 1e-3) -> bool:
    """Whether this model gives the padded values when packed (its decoder honours per-text position ids)."""
    with eval_mode(model):
        padded = sequence_nll(model, batch).phi
        packed = sequence_nll(model, batch, packed=True).phi
    return bool(torch.allclose(padded, packed, atol=atol, rtol=0, equal_nan=True))


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class TextsNLL:
    """NLL statistics of many texts, in input order (numpy)."""

    phi: np.ndarray
    nll_sum: np.ndarray
    n_tokens: np.ndarray
    token_nll: list[np.ndarray] | None = None  # per text, the NLL of each scored token


@torch.no_grad()
def texts_nll(model, tokenizer, texts: Sequence[str], contexts: Sequence[str] | None = None, batch_size: int = 16,
              max_length: int = 256, return_token_nll: bool = False, progress: bool = False) -> TextsNLL:
    """phi, NLL sum and token count of each text (conditioned on its context if given), length-bucketed."""
    device = next(model.parameters()).device
    lengths = [len(t) + (len(contexts[i]) if contexts is not None else 0) for i, t in enumerate(texts)]
    nll_sum = np.zeros(len(texts))
    n_tokens = np.zeros(len(texts), dtype=np.int64)
    per_token: list[np.ndarray] = [np.zeros(0)] * len(texts)
    with eval_mode(model):
        for idx in tqdm(length_buckets(lengths, batch_size), desc="NLL", disable=not progress):
            batch = encode(tokenizer, [texts[i] for i in idx],
                           None if contexts is None else [contexts[i] for i in idx], max_length).to(device)
            out = sequence_nll(model, batch, return_token_nll=return_token_nll)
            nll_sum[idx] = out.nll_sum.double().cpu().numpy()
            n_tokens[idx] = out.n_tokens.long().cpu().numpy()
            if return_token_nll:
                for row, i in enumerate(idx):
                    per_token[i] = out.token_nll[row][batch.target_mask[row]].cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        phi = np.where(n_tokens > 0, nll_sum / np.maximum(n_tokens, 1), np.nan)
    return TextsNLL(phi, nll_sum, n_tokens, per_token if return_token_nll else None)
