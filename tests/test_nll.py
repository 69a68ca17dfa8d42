"""The NLL engine against a naive float64 reference, padding invariance, chunking and gradients."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cpwb.engine.nll import encode, length_buckets, packing_matches, sequence_nll, start_token_id, texts_nll

TEXTS = ["The cat sat on the mat.", "hello", "You are a complete idiot and everyone hates you, honestly. " * 3, "A",
         "Thanks for the help with the report, it was great."]


def naive_phi(model, tokenizer, text: str, context: str | None = None) -> float:
    """Reference: one text alone, full float64 logits, log_softmax, mean over the scored tokens."""
    batch = encode(tokenizer, [text], None if context is None else [context])
    model64 = model.double()
    try:
        with torch.no_grad():
            logits = model64(input_ids=batch.input_ids).logits[0]
    finally:
        model.float()
    nll = -torch.log_softmax(logits[:-1], -1).gather(-1, batch.input_ids[0, 1:, None]).squeeze(-1)
    return nll[batch.target_mask[0, 1:]].mean().item()


@pytest.mark.parametrize("which", ["tiny_lm", "default_lm"])
@pytest.mark.parametrize("layout", ["right", "left", "packed"])
def test_batched_phi_matches_float64_reference(request, which, layout):
    model, tokenizer = request.getfixturevalue(which)
    reference = np.array([naive_phi(model, tokenizer, t) for t in TEXTS])
    batch = encode(tokenizer, TEXTS, padding_side="left" if layout == "left" else "right")
    with torch.no_grad():
        out = sequence_nll(model, batch, packed=layout == "packed")
    assert np.abs(out.phi.numpy() - reference).max() < 1e-4
    assert packing_matches(model, batch)


def test_a_bfloat16_body_stays_near_the_reference_with_the_head_in_fp32(default_lm):
    model, tokenizer = default_lm
    reference = np.array([naive_phi(model, tokenizer, t) for t in TEXTS])
    batch = encode(tokenizer, TEXTS)
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _, args, out: seen.append((args[0].dtype, out.dtype, torch.is_autocast_enabled("cpu"))))
    try:
        with torch.no_grad():
            fast = sequence_nll(model, batch, body_dtype=torch.bfloat16).phi.numpy()
            exact = sequence_nll(model, batch).phi.numpy()
    finally:
        hook.remove()
    assert seen and all(entry == (torch.float32, torch.float32, False) for entry in seen)
    assert np.abs(exact - reference).max() < 1e-4  # fp32 is untouched by the option
    # bfloat16 ran: on these short texts it moves phi by 0.01-0.29 nats, why no evaluation uses it
    # (benchmarks/perplexity_precision.py measures it on WikiText-2)
    assert 1e-3 < np.abs(fast - reference).max() < 0.5


def test_a_bfloat16_body_runs_on_a_model_whose_weights_are_bfloat16(fresh_tiny_lm):
    model, tokenizer = fresh_tiny_lm
    batch = encode(tokenizer, TEXTS)
    with torch.no_grad():
        exact = sequence_nll(model, batch).phi
        model.to(torch.bfloat16)
        fast = sequence_nll(model, batch, body_dtype=torch.bfloat16).phi  # states handed to the head in its dtype
    assert fast.dtype == torch.float32 and torch.allclose(fast, exact, atol=0.1)


def test_packing_check_catches_a_decoder_that_ignores_position_ids(fresh_tiny_lm):
    model, tokenizer = fresh_tiny_lm
    batch = encode(tokenizer, TEXTS)
    decoder = model.get_decoder()
    original = decoder.forward
    # A decoder that drops position ids (as a model without packed-sequence support would) lets texts see each other.
    decoder.forward = lambda *args, position_ids=None, **kwargs: original(*args, **kwargs)
    try:
        assert not packing_matches(model, batch)
    finally:
        decoder.forward = original


def test_small_chunks_give_the_same_values(tiny_lm):
    model, tokenizer = tiny_lm
    batch = encode(tokenizer, TEXTS)
    with torch.no_grad():
        whole = sequence_nll(model, batch).nll_sum
        chunked = sequence_nll(model, batch, chunk_logit_elements=len(tokenizer) * 3).nll_sum
    torch.testing.assert_close(whole, chunked, rtol=0, atol=1e-4)


def test_text_alone_equals_text_in_padded_batch(tiny_lm):
    model, tokenizer = tiny_lm
    alone = texts_nll(model, tokenizer, TEXTS[:1], batch_size=1).phi
    batched = texts_nll(model, tokenizer, TEXTS, batch_size=8).phi
    assert abs(alone[0] - batched[0]) < 1e-5


def test_every_token_is_scored_with_a_start_token(default_lm):
    model, tokenizer = default_lm
    start = start_token_id(tokenizer)
    assert start is not None  # SmolLM2's tokenizer adds no BOS: cpwb prepends one so the first word counts
    result = texts_nll(model, tokenizer, ["hello world"], return_token_nll=True)
    n_text_tokens = len(tokenizer("hello world", add_special_tokens=False)["input_ids"])
    assert result.n_tokens[0] == n_text_tokens and len(result.token_nll[0]) == n_text_tokens
    assert result.token_nll[0].mean() == pytest.approx(result.phi[0], abs=1e-6)


def test_context_is_conditioned_on_but_not_scored(tiny_lm):
    model, tokenizer = tiny_lm
    plain = texts_nll(model, tokenizer, ["a continuation"])
    conditioned = texts_nll(model, tokenizer, ["a continuation"], contexts=["Some prompt,"])
    assert conditioned.n_tokens[0] == plain.n_tokens[0]
    assert conditioned.phi[0] != pytest.approx(plain.phi[0])
    reference = naive_phi(model, tokenizer, "a continuation", context="Some prompt,")
    assert conditioned.phi[0] == pytest.approx(reference, abs=1e-4)


@pytest.mark.parametrize("packed", [False, True])
def test_gradients_flow_and_match_the_naive_path(fresh_tiny_lm, packed):
    model, tokenizer = fresh_tiny_lm
    batch = encode(tokenizer, TEXTS)
    model.zero_grad()
    sequence_nll(model, batch, chunk_logit_elements=len(tokenizer) * 4, packed=packed).phi.sum().backward()
    ours = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
    mask = batch.target_mask[:, 1:]
    ((nll * mask).sum(-1) / mask.sum(-1)).sum().backward()
    torch.testing.assert_close(ours, model.model.layers[0].self_attn.q_proj.weight.grad, rtol=1e-3, atol=1e-6)
    model.zero_grad()


def test_length_buckets_cover_all_indices_longest_first():
    buckets = length_buckets([3, 10, 1, 7, 5], batch_size=2)
    assert buckets == [[1, 3], [4, 0], [2]]


def test_sequence_kl_matches_a_naive_full_logits_kl(fresh_tiny_lm):
    from cpwb.engine.nll import scored_states, sequence_kl

    model, tokenizer = fresh_tiny_lm
    batch = encode(tokenizer, TEXTS)
    with torch.no_grad():
        base_states, _, _ = scored_states(model, batch)
        base_logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
        for p in model.model.parameters():  # the body changes, the head stays shared (as with a LoRA adapter)
            p.add_(0.02 * torch.randn_like(p))
        stats = sequence_nll(model, batch, keep_states=True)
        ours = sequence_kl(model, stats, base_states, chunk_logit_elements=len(tokenizer) * 5)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    log_q, log_p = torch.log_softmax(base_logits[:, :-1], -1), torch.log_softmax(logits[:, :-1], -1)
    token_kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    mask = batch.target_mask[:, 1:]
    naive = (token_kl * mask).sum(-1) / mask.sum(-1)
    torch.testing.assert_close(ours.double(), naive, rtol=1e-4, atol=1e-6)
    assert (ours > 0).all()


@pytest.mark.parametrize("layout", ["right", "left", "packed"])
def test_kl_on_selected_rows_matches_the_full_batch_kl(fresh_tiny_lm, layout):
    """The training KL runs the base on the selected texts only; their values equal the whole-batch computation."""
    from cpwb.engine.nll import scored_states, sequence_kl

    model, tokenizer = fresh_tiny_lm
    batch = encode(tokenizer, TEXTS, padding_side="left" if layout == "left" else "right")
    rows = torch.tensor([False, True, False, True, True])
    packed = layout == "packed"
    with torch.no_grad():
        full_base, _, _ = scored_states(model, batch, packed=packed)
        subset_base, _, _ = scored_states(model, batch.select(rows), packed=packed)
        for p in model.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        stats = sequence_nll(model, batch, keep_states=True, packed=packed)
        full = sequence_kl(model, stats, full_base)
        subset = sequence_kl(model, stats, subset_base, rows)
    torch.testing.assert_close(subset[rows], full[rows], rtol=1e-4, atol=1e-7)
    assert (subset[~rows] == 0).all() and (full[~rows] > 0).all()


def test_select_drops_columns_that_are_padding_in_every_kept_row(tiny_lm):
    _, tokenizer = tiny_lm
    for side in ("right", "left"):
        batch = encode(tokenizer, TEXTS, padding_side=side)
        picked = batch.select(torch.tensor([True, True, False, False, False]))
        alone = encode(tokenizer, TEXTS[:2], padding_side=side)
        assert torch.equal(picked.input_ids[picked.attention_mask.bool()], alone.input_ids[alone.attention_mask.bool()])
        assert picked.attention_mask.shape == alone.attention_mask.shape
        assert torch.equal(picked.target_mask, alone.target_mask)
