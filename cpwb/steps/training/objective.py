"""The configured objective on one anchor batch: phi of every text through the NLL engine, then the loss of
cpwb.engine.loss, plus the KL to the frozen base (the same model with its adapter disabled)."""
from __future__ import annotations

import torch

from cpwb.engine import loss as losses
from cpwb.engine.nll import SequenceNLL, TokenBatch, encode, scored_states, sequence_kl, sequence_nll
from cpwb.steps.training.batches import AnchorBatch
from cpwb.steps.training.config import TrainConfig


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
        value = value * batch.anchor_scale if batch.anchor_scale != 1.0 else value
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
    value = value * batch.anchor_scale if batch.anchor_scale != 1.0 else value
    if config.kl_weight > 0:
        kl_rows = is_pos if config.kl_data == "positives" else torch.tensor([r == "kl" for r in batch.role],
                                                                            device=phi.device)
        if kl_rows.any():
            kl = base_kl(model, tokens, stats, kl_rows, packed)
            metrics["kl"] = kl.item()
            scale = batch.anchor_scale if config.kl_data == "positives" else batch.kl_scale
            value = value + config.kl_weight * (kl * scale if scale != 1.0 else kl)
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
