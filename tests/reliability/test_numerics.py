"""Numerical safety: every objective finite and correctly signed over extreme inputs; NaN in a step stops training.

The grid: phi in [0, 50], tau in [0.01, 10], alpha in [0, 100], positives all equal, one positive or spread, in
float32 and bf16. "Correctly signed": the loss is >= 0 where it should be, descent pulls positives towards the
prototype and pushes negatives up (directional) or away from it (symmetric), preference losses raise the chosen.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file

from cpwb.core.config import from_dict
from cpwb.engine.loss import (
    CPLossConfig,
    cp_loss,
    dpo_loss,
    negatives_only_loss,
    positives_only_loss,
    reference_cp_loss,
    simpo_loss,
    token_unlikelihood,
)
from cpwb.engine.nll import encode, sequence_nll
from cpwb.steps.training.checkpoints import latest_checkpoint
from cpwb.steps.training.config import TrainConfig
from cpwb.steps.training.trainer import NonFiniteLossError, train
from tests.reliability.jobs import train_settings

PHIS = [0.0, 1e-3, 0.5, 2.0, 10.0, 25.0, 50.0]
TAUS = [0.01, 0.1, 1.0, 10.0]
ALPHAS = [0.0, 0.01, 1.0, 100.0]
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = 1e-6


def positive_sets() -> list[list[float]]:
    """Per anchor: three equal positives at each phi, one positive at each phi, and the whole range."""
    return [[phi] * 3 for phi in PHIS] + [[phi] for phi in PHIS] + [PHIS]


def ragged(rows: list[list[float]], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as (values padded with NaN, mask); values are leaves with gradients."""
    width = max(map(len, rows))
    values = torch.tensor([r + [float("nan")] * (width - len(r)) for r in rows], dtype=dtype, requires_grad=True)
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    return values, mask


def finite_grad(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The float32 gradient of a leaf, checked finite everywhere (padded slots included)."""
    assert tensor.grad is not None and torch.isfinite(tensor.grad.float()).all()
    return torch.where(mask, tensor.grad.float(), 0.0)


CP_CONFIGS = list(itertools.product(TAUS, ALPHAS, ("directional", "symmetric"), ("log_ppl", "ppl"), (0.0, 1.0)))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_cp_loss_is_finite_and_correctly_signed_over_the_grid(dtype):
    anchors = positive_sets()
    for tau, alpha, negatives, phi_form, anchor_weight in CP_CONFIGS:
        cfg = CPLossConfig(negatives=negatives, tau=tau, alpha=alpha, phi_form=phi_form, anchor_weight=anchor_weight)
        phi_pos, pos_mask = ragged(anchors, dtype)
        phi_neg, neg_mask = ragged([PHIS] * len(anchors), dtype)
        out = cp_loss(phi_pos, pos_mask, phi_neg, neg_mask, cfg)
        out.loss.backward()
        where = (tau, alpha, negatives, phi_form, anchor_weight)
        assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32, where
        assert (out.log_j <= TOLERANCE).all() and out.contrastive >= -TOLERANCE, where
        grad_pos, grad_neg = finite_grad(phi_pos, pos_mask), finite_grad(phi_neg, neg_mask)
        stat = (lambda x: torch.exp(x.float())) if phi_form == "ppl" else (lambda x: x.float())
        gap_neg = torch.where(neg_mask, stat(phi_neg.detach()) - out.prototype[:, None], 0.0)
        if alpha == 0:
            assert (grad_neg == 0).all(), where
        elif negatives == "directional":
            assert (grad_neg <= 0).all(), where  # descent raises every negative's phi
        else:
            assert (grad_neg * gap_neg <= TOLERANCE).all(), where  # descent moves negatives away from c
        if anchor_weight == 0:  # descent pulls positives towards the (detached) prototype
            gap_pos = torch.where(pos_mask, stat(phi_pos.detach()) - out.prototype[:, None], 0.0)
            assert (grad_pos * gap_pos >= -TOLERANCE).all(), where


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_reference_loss_is_finite_and_non_negative_over_the_grid(dtype):
    for tau, alpha in itertools.product(TAUS, ALPHAS):
        for rows in ([[phi] * 3 for phi in PHIS], [[phi] for phi in PHIS], [PHIS]):
            m_pos = torch.tensor(rows, dtype=dtype, requires_grad=True)
            m_hard = torch.tensor([PHIS] * len(rows), dtype=dtype, requires_grad=True)
            m_rand = torch.tensor([[25.0]] * len(rows), dtype=dtype, requires_grad=True)
            value = reference_cp_loss(m_pos, m_hard, m_rand, tau=tau, alpha=alpha)
            value.backward()
            assert torch.isfinite(value) and value >= 0, (tau, alpha, rows)
            assert all(torch.isfinite(t.grad.float()).all() for t in (m_pos, m_hard, m_rand)), (tau, alpha, rows)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_likelihood_ablations_are_finite_and_correctly_signed(dtype):
    phi, mask = ragged(positive_sets(), dtype)
    value = positives_only_loss(phi, mask)
    value.backward()
    assert torch.isfinite(value) and value >= 0 and (finite_grad(phi, mask)[mask] > 0).all()
    token_nll, mask = ragged(positive_sets(), dtype)  # each anchor's values as the token NLLs of one negative
    per_text = token_unlikelihood(token_nll, mask)
    value = negatives_only_loss(per_text[:, None], torch.ones(len(per_text), 1, dtype=torch.bool))
    value.backward()
    assert torch.isfinite(value) and value >= 0 and (finite_grad(token_nll, mask)[mask] <= 0).all()


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_preference_losses_are_finite_and_raise_the_chosen(dtype):
    anchors = positive_sets()
    for beta, length in itertools.product((0.01, 0.1, 1.0, 10.0), (1, 10, 100)):
        logp_pos, pos_mask = ragged([[-p * length for p in row] for row in anchors], dtype)
        logp_neg, neg_mask = ragged([[-p * length for p in PHIS]] * len(anchors), dtype)
        reference = [torch.zeros(v.shape, dtype=dtype) for v in (logp_pos, logp_neg)]
        value = dpo_loss(logp_pos, logp_neg, *reference, pos_mask, neg_mask, beta=beta)
        value.backward()
        assert torch.isfinite(value) and value >= 0, (beta, length)
        assert (finite_grad(logp_pos, pos_mask) <= 0).all() and (finite_grad(logp_neg, neg_mask) >= 0).all()
    for beta, gamma in itertools.product((0.5, 2.0, 10.0), (0.0, 0.5, 5.0)):
        avg_pos, pos_mask = ragged([[-p for p in row] for row in anchors], dtype)
        avg_neg, neg_mask = ragged([[-p for p in PHIS]] * len(anchors), dtype)
        value = simpo_loss(avg_pos, avg_neg, pos_mask, neg_mask, beta=beta, gamma=gamma)
        value.backward()
        assert torch.isfinite(value) and value >= 0, (beta, gamma)
        assert (finite_grad(avg_pos, pos_mask) <= 0).all() and (finite_grad(avg_neg, neg_mask) >= 0).all()


def test_bf16_model_gives_finite_phi_loss_and_gradients(fresh_tiny_lm):
    model, tokenizer = fresh_tiny_lm
    model = model.to(torch.bfloat16).train()
    texts = ["you are kind", "you are a complete idiot", "thanks", "shut up"]
    phi = sequence_nll(model, encode(tokenizer, texts)).phi
    assert phi.dtype == torch.bfloat16 or phi.dtype == torch.float32
    assert torch.isfinite(phi).all()
    out = cp_loss(phi[:2].reshape(1, 2), torch.ones(1, 2, dtype=torch.bool), phi[2:].reshape(1, 2),
                  torch.ones(1, 2, dtype=torch.bool), CPLossConfig(tau=0.01, alpha=100.0))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(out.loss) and grads and all(torch.isfinite(g.float()).all() for g in grads)


# ------------------------------------------------------------------------------------------------ NaN in a step


def poison_embeddings(monkeypatch, run_dir, after_checkpoint: int) -> None:
    """Make the input embeddings NaN in every forward pass once checkpoint `after_checkpoint` exists."""
    import cpwb.steps.training.trainer as trainer

    real, wanted = trainer.build_model, f"step-{after_checkpoint:06d}"

    def poisoned(module, args, output):
        last = latest_checkpoint(run_dir)
        return output * float("nan") if last is not None and last.name == wanted else None

    def build(config, device):
        model, tokenizer = real(config, device)
        model.get_input_embeddings().register_forward_hook(poisoned)
        return model, tokenizer

    monkeypatch.setattr(trainer, "build_model", build)


def poison_loss(monkeypatch, step: int, poison) -> None:
    """Replace the loss of optimizer step `step` (one objective call per step) by `poison(loss)`."""
    import cpwb.steps.training.trainer as trainer

    real, calls = trainer.objective_loss, []

    def loss(*args, **kwargs):
        value, metrics, tokens = real(*args, **kwargs)
        calls.append(1)
        return (poison(value) if len(calls) == step else value), metrics, tokens

    monkeypatch.setattr(trainer, "objective_loss", loss)


def nan_gradient(value: torch.Tensor) -> torch.Tensor:
    """The same finite loss, whose backward pass yields NaN gradients."""
    value.register_hook(lambda grad: grad * float("nan"))
    return value


# name -> (inject(monkeypatch, run_dir), step that must stop, last good checkpoint); 4 steps, checkpoints every 2
FAULTS = {
    "NaN activations in step 3": (lambda mp, run_dir: poison_embeddings(mp, run_dir, 2), 3, 2),
    "infinite loss in step 3": (lambda mp, run_dir: poison_loss(mp, 3, lambda v: v * float("inf")), 3, 2),
    "NaN gradients of a finite loss in checkpoint step 4": (lambda mp, run_dir: poison_loss(mp, 4, nan_gradient),
                                                            4, 2),
}


@pytest.mark.fault
@pytest.mark.parametrize("inject, step, last_good", FAULTS.values(), ids=FAULTS.keys())
def test_non_finite_step_stops_with_a_message_keeps_the_last_good_checkpoint_and_resumes(
        tiny_model_dir, pairs_file, tmp_path, monkeypatch, inject, step, last_good):
    settings = train_settings(tiny_model_dir, pairs_file, tmp_path / "run", steps=4, lora_dropout=0.0)
    with monkeypatch.context() as patch:
        inject(patch, tmp_path / "run")
        with pytest.raises(NonFiniteLossError, match=f"at step {step}.*step-{last_good:06d}") as error:
            train(from_dict(TrainConfig, settings))
    assert "\n" not in str(error.value)
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert [p.name for p in checkpoints] == [f"step-{last_good:06d}"]
    assert all(torch.isfinite(t).all() for t in load_file(str(checkpoints[0] / "adapter.safetensors")).values())
    assert not (tmp_path / "run" / "adapter").exists()
    result = train(from_dict(TrainConfig, settings), resume=True)  # the fault is gone: resume from the good one
    assert [m["step"] for m in result.metrics] == [1, 2, 3, 4]
    adapter = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values())
