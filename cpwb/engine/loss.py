"""The contrastive-perplexity (CP) loss, its ablations and preference baselines, as pure tensor functions.

Inputs are per-sequence statistics laid out per anchor: `values [A, K]` with a bool `mask [A, K]`, so each
anchor may have its own number of positives P_i and negatives N_i. Padded slots may hold anything (NaN, inf):
they are replaced with `torch.where` before any arithmetic, so they reach neither the loss nor a gradient.
Everything is computed in float32 whatever the input dtype, and every objective weighs anchors equally.
phi is a sequence's mean token NLL over its real tokens (log-perplexity), as `cpwb.engine.nll` computes it.

`cp_loss` (this workbench) against `reference_cp_loss` (the released code, SAP-samples/acl2025-contrastive-perplexity):

| aspect      | `cp_loss`                                         | `reference_cp_loss`                                |
|-------------|---------------------------------------------------|----------------------------------------------------|
| statistic   | phi over real tokens (`phi_form="ppl"`: exp(phi)) | m: mean NLL over the padded length; non-finite: 5  |
| prototype   | per anchor: mean over its own positives,          | one per micro-batch: mean m over all anchors'      |
|             | detached by default                               | positives, not detached                            |
| similarity  | log s = -|phi - c| / tau (tau: a temperature)    | logit z = exp(-|m - c|) / tau into a softmax:      |
|             |                                                   | logits bounded in (0, 1/tau], doubly exponential   |
| negatives   | `directional` (default): log s = -(phi - c)/tau,  | symmetric |m - c|: a toxic text also scores low by |
|             | falls only as a negative grows LESS likely than c | becoming MORE likely than the prototype            |
| alpha       | weight on negatives' s (log alpha added to log s) | added to hard negatives' logits = weight e^alpha   |
|             | alpha = 0 removes them                            | (e^100 by default): random negatives get gradients |
|             |                                                   | of about 1e-45 and the loss is dominated by the    |
|             |                                                   | constant P * alpha / (P + 1 + R)                   |
| reduction   | -mean over anchors of log J_i                     | -sum_P log softmax / (P + 1 + R), mean over        |
|             |                                                   | anchors, times beta                                |
| anchor term | + anchor_weight * mean phi(positives)             | none                                               |

The paper prints s = exp(-|phi - c|) / tau on raw perplexity; there tau scales numerator and denominator of J
alike and cancels. `cp_loss` with `phi_form="ppl"`, `negatives="symmetric"`, `tau=1`, `anchor_weight=0` is that
printed loss (averaged rather than summed over anchors).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cpwb.core.errors import ConfigError
from cpwb.core.settings import setting

LOSS_NAMES: tuple[str, ...] = ("cp", "reference", "positives_only", "negatives_only", "dpo", "simpo")

# phi is clamped here before exp in the "ppl" form: exp(80) ~ 5.5e34 stays finite in float32 (max ~3.4e38).
PPL_LOG_CLAMP = 80.0
# The released code replaces non-finite NLL values with this constant.
REFERENCE_NONFINITE_FILL = 5.0


def _check_number(field: str, value: float, low: float = -math.inf, high: float = math.inf,
                  strict_low: bool = False) -> None:
    """Raise ConfigError naming `field` unless `value` is a finite real number in the given range."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if strict_low else value >= low) and value <= high)
    if not ok:
        bound = f"{'>' if strict_low else '>='} {low:g}" + (f" and <= {high:g}" if high < math.inf else "")
        raise ConfigError(f"must be a finite number {bound}, got {value!r}", field=field)


@dataclass(frozen=True)
class CPLossConfig:
    """Settings of the CP loss; validated on construction so a bad config fails before any training step."""

    negatives: Literal["directional", "symmetric"] = setting(
        "directional", "directional: s = exp(-(phi - c) / tau) on negatives, so a negative only helps by becoming less "
                       "likely than the prototype; symmetric: exp(-|phi - c| / tau), the paper's printed form")
    tau: float = setting(0.5, "temperature inside the exponent: log s = -d / tau", check=">0")
    alpha: float = setting(1.0, "weight of the negatives in J's denominator; 0 disables the contrastive term",
                           check=">=0")
    phi_form: Literal["log_ppl", "ppl"] = setting(
        "log_ppl", "log_ppl: phi = mean token NLL; ppl: raw perplexity exp(phi), the printed form (its gradients "
                   "vanish)")
    detach_prototype: bool = setting(True, "no gradient through the prototype c")
    anchor_weight: float = setting(1.0, "lambda of the likelihood anchor: + lambda x mean phi(positives)",
                                   check=">=0")
    prototype: Literal["mean_positives", "first_positive"] = setting(
        "mean_positives", "mean_positives: c = mean phi of the anchor's positives; first_positive: its first "
                          "positive's (an ablation; J's numerator still sums all positives)")

    def __post_init__(self) -> None:
        """Reject unknown choices and out-of-range numbers with an error that names the field."""
        choices = {"negatives": ("directional", "symmetric"), "phi_form": ("log_ppl", "ppl"),
                   "prototype": ("mean_positives", "first_positive")}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ConfigError(f"must be one of {allowed}, got {getattr(self, field)!r}", field=field)
        if not isinstance(self.detach_prototype, bool):
            raise ConfigError(f"must be a bool, got {self.detach_prototype!r}", field="detach_prototype")
        _check_number("tau", self.tau, 0.0, strict_low=True)
        _check_number("alpha", self.alpha, 0.0)
        _check_number("anchor_weight", self.anchor_weight, 0.0)


@dataclass(frozen=True)
class CPLossOutput:
    """The CP loss with its parts, so training can log the contrastive and anchor terms separately."""

    loss: Tensor  # scalar: contrastive + anchor_weight * anchor
    log_j: Tensor  # [A]: log J_i, <= 0
    contrastive: Tensor  # scalar: -mean_i log J_i
    anchor: Tensor  # scalar: mean over anchors of the mean phi of their positives (unweighted)
    prototype: Tensor  # [A]: c_i, in the units of cfg.phi_form


def _slots(values: Tensor, mask: Tensor, name: str) -> Tensor:
    """`values` [A, K] as float32 with padded slots zeroed by `where`, so NaN/inf there never reach a gradient."""
    if values.dim() != 2 or values.shape != mask.shape:
        raise ValueError(f"{name}: expected values [anchors, slots] and a mask of the same shape, "
                         f"got {tuple(values.shape)} and {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name}: the mask must be bool, got {mask.dtype}")
    return torch.where(mask, values.float(), 0.0)


def _require_each_anchor(mask: Tensor, name: str) -> None:
    """Raise unless there are anchors and each has at least one real slot (a mean over none is undefined)."""
    if mask.shape[0] == 0 or not bool(mask.any(dim=1).all()):
        raise ValueError(f"{name}: every anchor needs at least one real slot")


def _require_same_anchors(pos_mask: Tensor, neg_mask: Tensor) -> None:
    """Raise unless positives and negatives cover the same number of anchors."""
    if pos_mask.shape[0] != neg_mask.shape[0]:
        raise ValueError(f"positives and negatives must cover the same anchors, "
                         f"got {pos_mask.shape[0]} and {neg_mask.shape[0]} rows")


def _slot_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Each anchor's [A] mean over its real slots (all dims but the first)."""
    return torch.where(mask, values, 0.0).flatten(1).sum(dim=1) / mask.flatten(1).sum(dim=1)


def _anchor_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over anchors of each anchor's mean over its real slots: every anchor weighs the same."""
    return _slot_mean(values, mask).mean()


def _masked_logsumexp(x: Tensor, mask: Tensor) -> Tensor:
    """logsumexp over the real slots of the last dim; -inf, with a zero (not NaN) gradient, where there are none."""
    x = torch.where(mask, x, -torch.inf)
    shift = x.amax(dim=-1, keepdim=True).detach()
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    total = torch.exp(x - shift).sum(dim=-1)
    empty = ~mask.any(dim=-1)
    return torch.where(empty, -torch.inf, torch.log(torch.where(empty, 1.0, total)) + shift.squeeze(-1))


def _statistic(phi: Tensor, cfg: CPLossConfig) -> Tensor:
    """The value compared with the prototype: phi itself, or raw perplexity exp(phi) (phi clamped at 80 first)."""
    return torch.exp(phi.clamp(max=PPL_LOG_CLAMP)) if cfg.phi_form == "ppl" else phi


def _prototype(pos: Tensor, pos_mask: Tensor, cfg: CPLossConfig) -> Tensor:
    """Per-anchor prototype c_i [A]: the mean over the anchor's positives, or its first positive (an ablation)."""
    if cfg.prototype == "first_positive":
        first = pos_mask.to(torch.uint8).argmax(dim=1, keepdim=True)
        proto = pos.gather(1, first).squeeze(1)
    else:
        proto = _slot_mean(pos, pos_mask)
    return proto.detach() if cfg.detach_prototype else proto


def cp_loss(phi_pos: Tensor, pos_mask: Tensor, phi_neg: Tensor, neg_mask: Tensor,
            cfg: CPLossConfig = CPLossConfig()) -> CPLossOutput:
    """CP loss: -mean_i log J_i + anchor_weight * mean phi(positives), J_i = sum_P s / (sum_P s + alpha sum_N s).

    s = exp(-|x - c_i| / tau) on positives; on negatives the same (`symmetric`) or exp(-(x - c_i) / tau)
    (`directional`), so a negative can only raise J by becoming less likely than the prototype. log J is computed
    with logsumexp, so s never underflows here (in the paper's linear-space form it does); but with
    `phi_form="ppl"` the differences are of order 1-30 (and grow exponentially with phi), so a negative far from
    c_i has a softmax weight near 0 and J saturates: its gradient vanishes, which is why log-perplexity is the
    default. The anchor term always uses phi
    (log-perplexity), whatever `phi_form`. An anchor without negatives has log J = 0; every anchor needs a positive.
    """
    nll_pos = _slots(phi_pos, pos_mask, "phi_pos")
    nll_neg = _slots(phi_neg, neg_mask, "phi_neg")
    _require_same_anchors(pos_mask, neg_mask)
    _require_each_anchor(pos_mask, "pos_mask")
    pos, neg = _statistic(nll_pos, cfg), _statistic(nll_neg, cfg)
    prototype = _prototype(pos, pos_mask, cfg)
    log_s_pos = -(pos - prototype[:, None]).abs() / cfg.tau
    gap = neg - prototype[:, None]
    log_s_neg = -(gap if cfg.negatives == "directional" else gap.abs()) / cfg.tau
    # alpha = 0: log alpha would be -inf, so the negatives are masked out instead (J = 1, zero gradients).
    log_alpha = math.log(cfg.alpha) if cfg.alpha > 0 else 0.0
    weighted_neg_mask = neg_mask if cfg.alpha > 0 else torch.zeros_like(neg_mask)
    log_denominator = _masked_logsumexp(torch.cat([log_s_pos, log_s_neg + log_alpha], dim=1),
                                        torch.cat([pos_mask, weighted_neg_mask], dim=1))
    log_j = _masked_logsumexp(log_s_pos, pos_mask) - log_denominator
    contrastive = -log_j.mean()
    anchor = _anchor_mean(nll_pos, pos_mask)
    return CPLossOutput(contrastive + cfg.anchor_weight * anchor, log_j, contrastive, anchor, prototype)


def _reference_rows(m: Tensor, name: str) -> Tensor:
    """Released-code inputs as float32 rows [A, K] (a 1-D tensor is one anchor), non-finite values set to 5.0."""
    if m.dim() not in (1, 2):
        raise ValueError(f"{name}: expected [slots] or [anchors, slots], got shape {tuple(m.shape)}")
    rows = m.float() if m.dim() == 2 else m.float()[None]
    return torch.where(torch.isfinite(rows), rows, REFERENCE_NONFINITE_FILL)


def reference_cp_loss(m_pos: Tensor, m_hard_neg: Tensor, m_rand_neg: Tensor, tau: float, alpha: float = 100.0,
                      beta: float = 1.0, label_smoothing: float = 0.0) -> Tensor:
    """The CP loss as the paper's released code computes it, for comparison (see the module docstring's table).

    m_* are [A, P], [A, N], [A, R] (or 1-D for one anchor): per-sequence mean token NLL over the padded length,
    computed elsewhere. One prototype c = mean of all m_pos (not detached); per anchor, logits
    z = exp(-|m - c|) / tau over [positives, hard negatives, random negatives], + alpha on hard negatives; soft
    cross entropy with targets 1 on positives, 0 on negatives, i.e. -sum_P log softmax(z), averaged over anchors,
    divided by (P + 1 + R), times beta. Label smoothing is torch's for probability targets: target
    t' = (1 - ls) * t + ls / (P + N + R) on every slot. Non-finite m are set to 5.0 here, per sequence; the released
    code does it per token before averaging, which a caller wanting exactness must do when it computes m.
    """
    _check_number("tau", tau, 0.0, strict_low=True)
    _check_number("alpha", alpha)
    _check_number("beta", beta, 0.0)
    _check_number("label_smoothing", label_smoothing, 0.0, 1.0)
    pos, hard, rand = (_reference_rows(m, name) for m, name in
                       ((m_pos, "m_pos"), (m_hard_neg, "m_hard_neg"), (m_rand_neg, "m_rand_neg")))
    if not pos.shape[0] == hard.shape[0] == rand.shape[0] or pos.shape[1] == 0:
        raise ValueError(f"m_pos, m_hard_neg, m_rand_neg must cover the same anchors, with at least one positive; "
                         f"got shapes {tuple(pos.shape)}, {tuple(hard.shape)}, {tuple(rand.shape)}")
    n_pos, n_hard, n_rand = pos.shape[1], hard.shape[1], rand.shape[1]
    logits = torch.exp(-(torch.cat([pos, hard, rand], dim=1) - pos.mean()).abs()) / tau
    hard_bonus = torch.zeros(n_pos + n_hard + n_rand, device=logits.device)
    hard_bonus[n_pos:n_pos + n_hard] = alpha
    targets = (torch.arange(logits.shape[1], device=logits.device) < n_pos).float().expand_as(logits)
    cross_entropy = F.cross_entropy(logits + hard_bonus, targets, label_smoothing=label_smoothing)
    return beta * cross_entropy / (n_pos + 1 + n_rand)


def positives_only_loss(phi_pos: Tensor, pos_mask: Tensor) -> Tensor:
    """Ablation: plain likelihood fine-tuning on the positives, the mean over anchors of their mean phi."""
    nll_pos = _slots(phi_pos, pos_mask, "phi_pos")
    _require_each_anchor(pos_mask, "pos_mask")
    return _anchor_mean(nll_pos, pos_mask)


def token_unlikelihood(token_nll: Tensor, token_mask: Tensor, min_nll: float = 1e-6) -> Tensor:
    """Per sequence, the mean over its scored tokens of -log(1 - p_t), p_t = exp(-nll_t) (Welleck et al., 2020).

    Its pull on a token grows as p_t / (1 - p_t): likely tokens are pushed down hard, unlikely ones barely. (The
    same on the geometric-mean probability exp(-phi) ~ 0.002 would have no gradient to speak of.) Computed as
    log(-expm1(-nll)) with nll clamped at `min_nll` (about 13.8 and no gradient below it); NaN without tokens.
    """
    _check_number("min_nll", min_nll, 0.0, strict_low=True)
    safe = torch.where(token_mask, token_nll.float(), 1.0).clamp(min=min_nll)  # unscored slots may hold anything
    values = torch.where(token_mask, -torch.log(-torch.expm1(-safe)), 0.0)
    return values.sum(-1) / token_mask.sum(-1)


def negatives_only_loss(unlikelihood_neg: Tensor, neg_mask: Tensor) -> Tensor:
    """Ablation: token-level unlikelihood of the negatives (`token_unlikelihood` per text), mean over anchors."""
    _require_each_anchor(neg_mask, "neg_mask")
    return _anchor_mean(_slots(unlikelihood_neg, neg_mask, "unlikelihood_neg"), neg_mask)


def _pairwise_logistic_loss(chosen: Tensor, pos_mask: Tensor, rejected: Tensor, neg_mask: Tensor, beta: float,
                            gamma: float) -> Tensor:
    """-log sigmoid(beta * (chosen - rejected) - gamma) over every positive x negative pair, averaged per anchor."""
    _require_same_anchors(pos_mask, neg_mask)
    _require_each_anchor(pos_mask, "pos_mask")
    _require_each_anchor(neg_mask, "neg_mask")
    margin = beta * (chosen[:, :, None] - rejected[:, None, :]) - gamma
    return _anchor_mean(-F.logsigmoid(margin), pos_mask[:, :, None] & neg_mask[:, None, :])


def dpo_loss(logp_pos: Tensor, logp_neg: Tensor, ref_logp_pos: Tensor, ref_logp_neg: Tensor, pos_mask: Tensor,
             neg_mask: Tensor, beta: float = 0.1) -> Tensor:
    """DPO baseline on the CP pairs (a positive chosen over a negative of the same anchor, all P x N pairs).

    logp are per-sequence SUMS of token log-probs (-nll_sum) under the policy and the frozen reference (detached
    here); loss = -mean log sigmoid(beta * ((lp_c - ref_c) - (lp_r - ref_r))), each anchor weighing the same.
    """
    _check_number("beta", beta, 0.0, strict_low=True)
    chosen = _slots(logp_pos, pos_mask, "logp_pos") - _slots(ref_logp_pos, pos_mask, "ref_logp_pos").detach()
    rejected = _slots(logp_neg, neg_mask, "logp_neg") - _slots(ref_logp_neg, neg_mask, "ref_logp_neg").detach()
    return _pairwise_logistic_loss(chosen, pos_mask, rejected, neg_mask, beta, 0.0)


def simpo_loss(avg_logp_pos: Tensor, avg_logp_neg: Tensor, pos_mask: Tensor, neg_mask: Tensor, beta: float = 2.0,
               gamma: float = 0.5) -> Tensor:
    """SimPO baseline on the CP pairs: -mean log sigmoid(beta * (avg_c - avg_r) - gamma), no reference model.

    avg_logp is the length-normalised log-probability, -phi; each anchor weighs the same.
    """
    _check_number("beta", beta, 0.0, strict_low=True)
    _check_number("gamma", gamma)
    chosen = _slots(avg_logp_pos, pos_mask, "avg_logp_pos")
    rejected = _slots(avg_logp_neg, neg_mask, "avg_logp_neg")
    return _pairwise_logistic_loss(chosen, pos_mask, rejected, neg_mask, beta, gamma)
