"""Tests of cpwb.engine.loss: closed forms, gradient signs, masking, numerical safety and config validation."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from cpwb.core.errors import ConfigError
from cpwb.engine.loss import (
    LOSS_NAMES,
    CPLossConfig,
    cp_loss,
    dpo_loss,
    negatives_only_loss,
    positives_only_loss,
    reference_cp_loss,
    simpo_loss,
    token_unlikelihood,
)

NO_ANCHOR = dict(anchor_weight=0.0)


def batch(pos: list[list[float]], neg: list[list[float]], pad: float = 0.0, dtype: torch.dtype = torch.float32):
    """Ragged per-anchor lists as (phi_pos, pos_mask, phi_neg, neg_mask), padded with `pad`, leaves with grad."""
    def pack(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        values = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=dtype, requires_grad=True)
        mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
        return values, mask
    return (*pack(pos), *pack(neg))


def neg_grad(pos: list[float], neg: list[float], **cfg) -> torch.Tensor:
    """d loss / d phi_neg for one anchor."""
    phi_pos, pos_mask, phi_neg, neg_mask = batch([pos], [neg])
    cp_loss(phi_pos, pos_mask, phi_neg, neg_mask, CPLossConfig(**cfg)).loss.backward()
    return phi_neg.grad[0]


def test_loss_names() -> None:
    assert LOSS_NAMES == ("cp", "reference", "positives_only", "negatives_only", "dpo", "simpo")


@pytest.mark.parametrize("negatives, neg_exponent", [("directional", 0.2), ("symmetric", -0.2)])
def test_closed_form_one_anchor(negatives: str, neg_exponent: float) -> None:
    # c = 1.2; positives at distance 0.2 -> exp(-0.4); the negative 1.1 is 0.1 below c -> exp(+-0.2).
    out = cp_loss(*batch([[1.0, 1.4]], [[1.1]]), CPLossConfig(negatives=negatives, tau=0.5, alpha=1.0))
    j = 2 * math.exp(-0.4) / (2 * math.exp(-0.4) + math.exp(neg_exponent))
    assert out.log_j.item() == pytest.approx(math.log(j), abs=1e-6)
    assert out.contrastive.item() == pytest.approx(-math.log(j), abs=1e-6)
    assert out.anchor.item() == pytest.approx(1.2, abs=1e-6)
    assert out.loss.item() == pytest.approx(-math.log(j) + 1.2, abs=1e-6)
    assert out.prototype.tolist() == pytest.approx([1.2])
    assert out.loss.dtype == torch.float32


def test_alpha_weights_negatives() -> None:
    base = dict(tau=0.5, **NO_ANCHOR)
    losses = [cp_loss(*batch([[1.0, 1.4]], [[1.1, 2.0]]), CPLossConfig(alpha=a, **base)).loss.item()
              for a in (0.5, 1.0, 3.0)]
    assert losses[0] < losses[1] < losses[2]
    phi_pos, pos_mask, phi_neg, neg_mask = batch([[1.0, 1.4]], [[1.1, float("nan")]])
    out = cp_loss(phi_pos, pos_mask, phi_neg, neg_mask, CPLossConfig(alpha=0.0, **base))
    out.loss.backward()
    assert out.contrastive.item() == pytest.approx(0.0, abs=1e-6)
    assert phi_neg.grad.tolist() == [[0.0, 0.0]] and torch.isfinite(phi_pos.grad).all()


@pytest.mark.parametrize("detach", [True, False])
def test_directional_always_pushes_negatives_up(detach: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        pos = (torch.rand(3, generator=gen) * 5).tolist()
        neg = (torch.rand(4, generator=gen) * 5).tolist()  # below and above the prototype
        assert (neg_grad(pos, neg, tau=1.0, detach_prototype=detach) < 0).all()


def test_symmetric_pulls_a_likely_negative_further_down() -> None:
    # Prototype 2.0; negative below it (more likely than the positives) and above it.
    below, above = neg_grad([2.0], [1.7, 2.3], negatives="symmetric")
    assert below > 0 and above < 0  # descent lowers phi of the likelier toxic text: the documented failure
    assert (neg_grad([2.0], [1.7, 2.3], negatives="directional") < 0).all()


def test_tau_sets_gradient_magnitude() -> None:
    # P = {c}, N = {c + d}: loss = log(1 + e^{-d/tau}), so d loss / d phi_neg = -sigmoid(-d/tau) / tau.
    d = 0.05
    grads = {tau: neg_grad([2.0], [2.0 + d], tau=tau, **NO_ANCHOR).item() for tau in (0.1, 1.0)}
    for tau, grad in grads.items():
        assert grad == pytest.approx(-1 / (1 + math.exp(d / tau)) / tau, rel=1e-5)
    assert abs(grads[0.1]) > 5 * abs(grads[1.0])


def test_anchor_weight_adds_lambda_mean_phi_and_its_gradient() -> None:
    pos, neg = [[1.0, 1.4], [2.0, 2.5, 3.0]], [[1.1], [0.5, 4.0]]
    results = []
    for weight in (0.0, 0.7):
        phi_pos, pos_mask, phi_neg, neg_mask = batch(pos, neg)
        loss = cp_loss(phi_pos, pos_mask, phi_neg, neg_mask, CPLossConfig(anchor_weight=weight)).loss
        loss.backward()
        results.append((loss.item(), phi_pos.grad, phi_neg.grad))
    mean_phi = (1.2 + 2.5) / 2
    assert results[1][0] - results[0][0] == pytest.approx(0.7 * mean_phi, abs=1e-5)
    expected = torch.tensor([[0.7 / 4, 0.7 / 4, 0.0], [0.7 / 6, 0.7 / 6, 0.7 / 6]])
    assert torch.allclose(results[1][1] - results[0][1], expected, atol=1e-6)
    assert torch.equal(results[1][2], results[0][2])


def test_padding_values_never_leak() -> None:
    pos, neg = [[1.0], [2.0, 2.5, 3.0]], [[1.1, 0.3, 4.0], [0.5]]
    outputs = []
    for pad in (0.0, float("nan"), float("inf"), -float("inf")):
        for cfg in (CPLossConfig(), CPLossConfig(negatives="symmetric", phi_form="ppl", detach_prototype=False)):
            phi_pos, pos_mask, phi_neg, neg_mask = batch(pos, neg, pad=pad)
            out = cp_loss(phi_pos, pos_mask, phi_neg, neg_mask, cfg)
            out.loss.backward()
            assert torch.isfinite(phi_pos.grad).all() and torch.isfinite(phi_neg.grad).all()
            assert (phi_pos.grad[~pos_mask] == 0).all() and (phi_neg.grad[~neg_mask] == 0).all()
            outputs.append((cfg, out.loss.item(), phi_pos.grad, phi_neg.grad))
    reference = {cfg: (loss, gp, gn) for cfg, loss, gp, gn in outputs[:2]}
    for cfg, loss, gp, gn in outputs:
        assert loss == reference[cfg][0] and torch.equal(gp, reference[cfg][1]) and torch.equal(gn, reference[cfg][2])


def test_ragged_batch_equals_mean_of_single_anchors() -> None:
    pos, neg = [[1.0], [2.0, 2.5, 3.0]], [[1.1, 0.3, 4.0], [0.5]]
    for cfg in (CPLossConfig(), CPLossConfig(negatives="symmetric", prototype="first_positive", alpha=2.0)):
        joint = cp_loss(*batch(pos, neg, pad=float("nan")), cfg).loss.item()
        single = [cp_loss(*batch([p], [n]), cfg).loss.item() for p, n in zip(pos, neg)]
        assert joint == pytest.approx(sum(single) / 2, abs=1e-6)


def test_anchor_without_negatives_has_log_j_zero() -> None:
    phi_pos, pos_mask, phi_neg, neg_mask = batch([[1.0, 2.0], [1.5]], [[3.0], [0.0]])
    neg_mask[1, 0] = False
    out = cp_loss(phi_pos, pos_mask, phi_neg, neg_mask, CPLossConfig())
    out.loss.backward()
    assert out.log_j[1].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(phi_pos.grad).all() and phi_neg.grad[1, 0] == 0


def test_first_positive_prototype() -> None:
    out = cp_loss(*batch([[1.0, 1.4]], [[1.1]]), CPLossConfig(prototype="first_positive", tau=0.5, **NO_ANCHOR))
    # c = 1.0: positives s = 1, exp(-0.8); directional negative s = exp(-0.2).
    j = (1 + math.exp(-0.8)) / (1 + math.exp(-0.8) + math.exp(-0.2))
    assert out.prototype.tolist() == pytest.approx([1.0]) and out.loss.item() == pytest.approx(-math.log(j), abs=1e-6)


def test_detach_prototype_controls_gradient_through_c() -> None:
    grads = []
    for detach in (True, False):
        phi_pos, pos_mask, phi_neg, neg_mask = batch([[1.0, 1.4]], [[1.1]])
        cfg = CPLossConfig(detach_prototype=detach, **NO_ANCHOR)
        cp_loss(phi_pos, pos_mask, phi_neg, neg_mask, cfg).loss.backward()
        grads.append(phi_pos.grad.sum().item())
    assert grads[0] == pytest.approx(0.0, abs=1e-6)  # |phi - c| symmetric about c: the two pulls cancel
    assert grads[1] != pytest.approx(0.0, abs=1e-3)  # through c the negative's term moves the positives too


def test_finite_over_extreme_grid() -> None:
    phis = [0.0, 1e-3, 5.0, 25.0, 50.0]
    for tau, alpha, negatives, phi_form in itertools.product((0.01, 1.0, 10.0), (0.0, 1.0, 100.0),
                                                            ("directional", "symmetric"), ("log_ppl", "ppl")):
        cfg = CPLossConfig(negatives=negatives, tau=tau, alpha=alpha, phi_form=phi_form, detach_prototype=False)
        for pos in ([[5.0, 5.0, 5.0]], [phis], [[50.0]]):  # equal positives (|d| = 0), the whole range, one positive
            phi_pos, pos_mask, phi_neg, neg_mask = batch(pos, [phis], dtype=torch.bfloat16)
            out = cp_loss(phi_pos, pos_mask, phi_neg, neg_mask, cfg)
            out.loss.backward()
            assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss), (cfg, pos)
            assert torch.isfinite(phi_pos.grad.float()).all() and torch.isfinite(phi_neg.grad.float()).all(), (cfg, pos)


def test_ppl_form_compares_raw_perplexity() -> None:
    out = cp_loss(*batch([[1.0, 1.4]], [[1.1]]), CPLossConfig(phi_form="ppl", negatives="symmetric", tau=1.0,
                                                             **NO_ANCHOR))
    p1, p2, n = math.exp(1.0), math.exp(1.4), math.exp(1.1)
    c = (p1 + p2) / 2
    s = [math.exp(-abs(x - c)) for x in (p1, p2, n)]
    assert out.prototype.item() == pytest.approx(c, rel=1e-6)
    assert out.loss.item() == pytest.approx(-math.log((s[0] + s[1]) / sum(s)), abs=1e-6)


def reference_by_hand(pos: list[list[float]], hard: list[list[float]], rand: list[list[float]], tau: float,
                      alpha: float, smoothing: float = 0.0) -> float:
    """The released code's loss written out with math: shared prototype, per-anchor softmax, mean over anchors."""
    c = sum(map(sum, pos)) / sum(map(len, pos))
    total = 0.0
    for p, h, r in zip(pos, hard, rand):
        logits = [math.exp(-abs(m - c)) / tau + (alpha if i in range(len(p), len(p) + len(h)) else 0.0)
                  for i, m in enumerate(p + h + r)]
        log_z = math.log(sum(math.exp(z) for z in logits))
        targets = [(1 - smoothing) * (i < len(p)) + smoothing / len(logits) for i in range(len(logits))]
        total += -sum(t * (z - log_z) for t, z in zip(targets, logits))
    return total / len(pos) / (len(pos[0]) + 1 + len(rand[0]))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_reference_matches_hand_computation(smoothing: float) -> None:
    one = reference_cp_loss(torch.tensor([1.0, 1.2]), torch.tensor([2.0]), torch.tensor([0.5]), tau=0.5, alpha=1.0,
                            label_smoothing=smoothing)
    assert one.item() == pytest.approx(reference_by_hand([[1.0, 1.2]], [[2.0]], [[0.5]], 0.5, 1.0, smoothing),
                                       abs=1e-6)
    pos, hard, rand = [[1.0, 1.2], [3.0, 2.6]], [[2.0, 0.4], [1.0, 5.0]], [[0.5], [4.0]]
    two = reference_cp_loss(torch.tensor(pos), torch.tensor(hard), torch.tensor(rand), tau=0.2, alpha=1.5, beta=2.0,
                            label_smoothing=smoothing)
    assert two.item() == pytest.approx(2.0 * reference_by_hand(pos, hard, rand, 0.2, 1.5, smoothing), abs=1e-5)


def test_reference_alpha_100_starves_random_negatives() -> None:
    m_pos = torch.tensor([2.0, 2.2, 2.4, 2.1, 2.3, 2.5], requires_grad=True)
    m_hard = torch.tensor([2.5, 3.0, 3.5, 1.5, 4.0, 2.8], requires_grad=True)
    m_rand = torch.tensor([1.0, 2.0, 2.9, 3.3, 4.4, 5.5], requires_grad=True)
    loss = reference_cp_loss(m_pos, m_hard, m_rand, tau=1.0, alpha=100.0)
    loss.backward()
    assert m_rand.grad.abs().max() < 1e-30
    assert m_hard.grad.abs().max() > 1e-3
    assert loss.item() == pytest.approx(6 * 100.0 / (6 + 1 + 6), rel=0.05)  # the constant dominates


def test_reference_replaces_non_finite_by_five() -> None:
    m_pos = torch.tensor([1.0, float("nan")], requires_grad=True)
    loss = reference_cp_loss(m_pos, torch.tensor([float("inf")]), torch.tensor([0.5]), tau=0.5, alpha=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(reference_by_hand([[1.0, 5.0]], [[5.0]], [[0.5]], 0.5, 1.0), abs=1e-6)
    assert m_pos.grad[1] == 0 and torch.isfinite(m_pos.grad).all()


def test_positives_only_is_mean_phi() -> None:
    phi_pos, pos_mask, _, _ = batch([[1.0, 3.0], [2.0]], [[0.0]], pad=float("nan"))
    loss = positives_only_loss(phi_pos, pos_mask)
    loss.backward()
    assert loss.item() == pytest.approx(2.0) and phi_pos.grad.tolist() == [[0.25, 0.25], [0.5, 0.0]]


def test_token_unlikelihood_pushes_likely_tokens_up_hardest_and_ignores_unscored_ones() -> None:
    token_nll = torch.tensor([[0.0, 0.5, 2.0, 6.0], [0.0, 1e-9, 0.0, 0.0]], requires_grad=True)
    token_mask = torch.tensor([[False, True, True, True], [False, True, False, False]])
    per_text = token_unlikelihood(token_nll, token_mask)
    expected = -sum(math.log(1 - math.exp(-x)) for x in (0.5, 2.0, 6.0)) / 3
    assert per_text[0].item() == pytest.approx(expected, abs=1e-6) and math.isfinite(per_text[1].item())
    per_text.sum().backward()
    grad = token_nll.grad[0]
    assert grad[0] == 0 and (grad[1:] < 0).all()  # descent raises every scored token's NLL
    assert -grad[1] / -grad[3] == pytest.approx((math.exp(-0.5) / (1 - math.exp(-0.5))) /
                                                (math.exp(-6.0) / (1 - math.exp(-6.0))), rel=1e-4)
    assert torch.isfinite(token_nll.grad).all() and token_nll.grad[1, 1] == 0  # clamped below min_nll


def test_negatives_only_is_the_anchor_mean_of_per_text_unlikelihood() -> None:
    _, _, values, neg_mask = batch([[0.0], [0.0]], [[1.0, 3.0], [2.0]], pad=float("nan"))
    loss = negatives_only_loss(values, neg_mask)
    loss.backward()
    assert loss.item() == pytest.approx((2.0 + 2.0) / 2)
    assert values.grad.tolist() == [[0.25, 0.25], [0.5, 0.0]]


def test_dpo_hand_example_and_gradient_signs() -> None:
    lp_pos = torch.tensor([[-10.0]], requires_grad=True)
    lp_neg = torch.tensor([[-9.0]], requires_grad=True)
    ones = torch.ones(1, 1, dtype=torch.bool)
    loss = dpo_loss(lp_pos, lp_neg, torch.tensor([[-12.0]]), torch.tensor([[-8.0]]), ones, ones, beta=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.3)), abs=1e-6)  # margin 0.1 * (2 - (-1))
    assert lp_pos.grad.item() < 0 < lp_neg.grad.item()


def test_simpo_hand_example_and_gradient_signs() -> None:
    avg_pos = torch.tensor([[-1.0]], requires_grad=True)
    avg_neg = torch.tensor([[-1.5]], requires_grad=True)
    ones = torch.ones(1, 1, dtype=torch.bool)
    loss = simpo_loss(avg_pos, avg_neg, ones, ones, beta=2.0, gamma=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)  # margin 2 * 0.5 - 0.5
    assert avg_pos.grad.item() < 0 < avg_neg.grad.item()


def test_pair_losses_average_all_pairs_per_anchor() -> None:
    phi_pos, pos_mask, phi_neg, neg_mask = batch([[1.0, 2.0], [1.5]], [[3.0], [0.5, 2.5]], pad=float("nan"))
    loss = simpo_loss(-phi_pos, -phi_neg, pos_mask, neg_mask, beta=1.0, gamma=0.0)
    loss.backward()
    pair = lambda chosen, rejected: math.log1p(math.exp(-(rejected - chosen)))  # noqa: E731 (-logsigmoid)
    expected = ((pair(1.0, 3.0) + pair(2.0, 3.0)) / 2 + (pair(1.5, 0.5) + pair(1.5, 2.5)) / 2) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert torch.isfinite(phi_pos.grad).all() and torch.isfinite(phi_neg.grad).all()
    zeros = torch.zeros_like(phi_pos)
    assert dpo_loss(-phi_pos, -phi_neg, zeros, torch.zeros_like(phi_neg), pos_mask, neg_mask, beta=1.0).item() \
        == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("field, value", [("tau", 0.0), ("tau", -1.0), ("tau", float("inf")), ("alpha", -0.1),
                                          ("anchor_weight", -1.0), ("negatives", "both"), ("phi_form", "nll"),
                                          ("prototype", "median"), ("detach_prototype", "yes")])
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as info:
        CPLossConfig(**{field: value})
    assert isinstance(info.value, ConfigError) and info.value.field == field


def test_input_validation() -> None:
    phi_pos, pos_mask, phi_neg, neg_mask = batch([[1.0], [2.0]], [[1.0], [2.0]])
    with pytest.raises(ValueError, match="pos_mask"):
        cp_loss(phi_pos, torch.tensor([[True], [False]]), phi_neg, neg_mask)
    with pytest.raises(ValueError, match="same anchors"):
        cp_loss(phi_pos, pos_mask, phi_neg[:1], neg_mask[:1])
    with pytest.raises(ValueError, match="bool"):
        cp_loss(phi_pos, pos_mask.float(), phi_neg, neg_mask)
    with pytest.raises(ValueError, match="tau"):
        reference_cp_loss(torch.ones(2), torch.ones(1), torch.ones(1), tau=0.0)
    with pytest.raises(ValueError, match="neg_mask"):
        dpo_loss(phi_pos, phi_neg, phi_pos, phi_neg, pos_mask, torch.tensor([[True], [False]]))
