"""What a model's likelihoods say: WikiText-2 perplexity by strided windows, the perplexity of continuations,
zero-shot multiple choice, and the phi gap of toxic and neutral paraphrases. Every likelihood goes through
cpwb.engine.nll."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cpwb.core.errors import InputError
from cpwb.data.corpora import MultipleChoice, load_wikitext2_test
from cpwb.engine.device import eval_mode, pad_token_id
from cpwb.engine.nll import TokenBatch, sequence_nll, start_token_id, texts_nll


def strided_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) of each sliding window, HF-perplexity-guide style: every token scored once.

    A window scores the tokens after the previous window's end, with at least window - stride tokens of context
    (so stride < window; the first token of the text is never scored).
    """
    if not 1 <= stride < window:
        raise InputError(f"need 1 <= stride < window, got stride {stride}, window {window}", field="stride")
    if n_tokens < 2:
        raise InputError(f"need at least 2 tokens to score one, got {n_tokens}", field="text")
    windows, previous_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        windows.append((begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end == n_tokens:
            break
    return windows


def token_stream(tokenizer, text: str) -> list[int]:
    """A whole text's token ids after the model's start token, so its first word is scored too (as in
    cpwb.engine.nll)."""
    start = start_token_id(tokenizer)
    ids = tokenizer(text, add_special_tokens=start is None, verbose=False)["input_ids"]
    return ids if start is None else [start, *ids]


@torch.no_grad()
def strided_nll(model, ids: Sequence[int], windows: Sequence[tuple[int, int, int]], batch_size: int = 4,
                pad_id: int = 0, progress: bool = False,
                body_dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """NLL sum and number of scored tokens of each of the given `strided_windows` of a token stream, batched
    (`body_dtype`: see cpwb.engine.nll.scored_states)."""
    device = next(model.parameters()).device
    stream = torch.tensor(list(ids), dtype=torch.long)
    nll_sum, n_scored = np.zeros(len(windows)), np.zeros(len(windows), dtype=np.int64)
    with eval_mode(model):
        for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
            group = windows[start:start + batch_size]
            width = max(end - begin for begin, end, _ in group)
            input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(group), width), dtype=torch.long)
            target = torch.zeros((len(group), width), dtype=torch.bool)
            for row, (begin, end, first) in enumerate(group):
                input_ids[row, :end - begin] = stream[begin:end]
                attention[row, :end - begin] = 1
                target[row, first - begin:end - begin] = True
            out = sequence_nll(model, TokenBatch(input_ids, attention, target).to(device), body_dtype=body_dtype)
            nll_sum[start:start + len(group)] = out.nll_sum.double().cpu().numpy()
            n_scored[start:start + len(group)] = out.n_tokens.long().cpu().numpy()
    return nll_sum, n_scored


def wikitext2_perplexity(model, tokenizer, text: str | None = None, window: int = 512, stride: int = 256,
                         max_windows: int | None = None, batch_size: int = 4,
                         progress: bool = False) -> dict[str, Any]:
    """Fluency: perplexity of the WikiText-2 test set (or `text`) by strided windows, exp(total NLL / tokens).

    The text is tokenised once (`token_stream`); `max_windows` scores only the first windows, a fast subset:
    `n_scored_tokens` says how many of the `n_text_tokens` counted. `windows` holds each window's NLL sum and
    scored tokens (for intervals over windows).
    """
    ids = token_stream(tokenizer, load_wikitext2_test() if text is None else text)
    windows = strided_windows(len(ids), window, stride)
    chosen = windows[:max_windows] if max_windows is not None else windows
    pad_id = pad_token_id(tokenizer)
    window_nll, window_tokens = strided_nll(model, ids, chosen, batch_size, pad_id, progress)
    nll_sum, n_scored = float(window_nll.sum()), int(window_tokens.sum())
    return {"perplexity": math.exp(nll_sum / n_scored), "nll_sum": nll_sum, "n_scored_tokens": n_scored,
            "n_text_tokens": len(ids) - 1, "n_windows": len(chosen), "n_windows_total": len(windows),
            "window": window, "stride": stride,
            "windows": pd.DataFrame({"window": np.arange(len(chosen)), "begin": [w[0] for w in chosen],
                                     "nll_sum": window_nll, "n_tokens": window_tokens})}


def conditional_perplexity(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str],
                           batch_size: int = 16, progress: bool = False) -> float:
    """exp of the token-weighted mean NLL of continuations given their prompts (fluency of generations)."""
    out = texts_nll(model, tokenizer, continuations, contexts=prompts, batch_size=batch_size, progress=progress)
    return math.exp(out.nll_sum.sum() / out.n_tokens.sum())


def multiple_choice_accuracy(model, tokenizer, items: Sequence[MultipleChoice], normalize: str = "length",
                             choice_prefix: str = " ", batch_size: int = 16, progress: bool = False) -> dict[str, Any]:
    """Zero-shot accuracy: pick the choice with the highest log-likelihood given the context.

    normalize="none" compares summed NLL (lm-eval's acc); "length" compares mean NLL per token (acc_norm-like,
    but per token, not per byte as lm-eval's acc_norm). `choice_prefix` is put before each choice unless the
    context ends or the choice starts with whitespace (lm-eval's " " + ending). Ties go to the first choice.
    """
    if normalize not in ("length", "none"):
        raise InputError(f"must be 'length' or 'none', got {normalize!r}", field="normalize")
    contexts, texts = [], []
    for item in items:
        for choice in item.choices:
            joined = item.context[-1:].isspace() or choice[:1].isspace()
            contexts.append(item.context)
            texts.append(choice if joined else choice_prefix + choice)
    out = texts_nll(model, tokenizer, texts, contexts=contexts, batch_size=batch_size, progress=progress)
    nll = out.phi if normalize == "length" else out.nll_sum
    rows, offset = [], 0
    for item in items:
        item_nll = nll[offset:offset + len(item.choices)]
        offset += len(item.choices)
        prediction = int(np.argmin(item_nll))
        rows.append({"id": item.id, "label": item.label, "prediction": prediction,
                     "correct": prediction == item.label, "nll": item_nll.tolist()})
    table = pd.DataFrame(rows, columns=["id", "label", "prediction", "correct", "nll"])
    return {"accuracy": float(table["correct"].mean()) if rows else math.nan, "n_items": len(rows),
            "normalize": normalize, "predictions": table}


def phi_gap(model, tokenizer, toxic: Sequence[str], neutral: Sequence[str], batch_size: int = 16,
            progress: bool = False) -> dict[str, Any]:
    """Per pair phi(toxic) - phi(neutral), phi = mean token NLL (log-perplexity): > 0 means the toxic text is less
    likely, which is what contrastive-perplexity training aims at."""
    if len(toxic) != len(neutral):
        raise InputError(f"{len(toxic)} toxic texts but {len(neutral)} neutral ones", field="neutral")
    phi = texts_nll(model, tokenizer, [*toxic, *neutral], batch_size=batch_size, progress=progress).phi
    phi_toxic, phi_neutral = phi[:len(toxic)], phi[len(toxic):]
    gaps = phi_toxic - phi_neutral
    return {"mean_gap": float(np.mean(gaps)), "share_positive": float(np.mean(gaps > 0)), "n_pairs": len(gaps),
            "gaps": gaps, "phi_toxic": phi_toxic, "phi_neutral": phi_neutral}
