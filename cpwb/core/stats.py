"""Confidence intervals over evaluation items (prompts, pairs, windows, questions), by scipy's bootstrap.

Every figure cpwb reports is a statistic over items; its 95% interval comes from resampling those items
(`scipy.stats.bootstrap`, BCa, falling back to the percentile interval where BCa is undefined, e.g. for an all-zero
column). A base-vs-adapter comparison resamples the *same* items for both (paired), which is what makes a small
difference on shared prompts distinguishable from noise. Seeded: the same inputs give the same interval.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cpwb.core.errors import InputError

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap interval (`low`, `high`); `n` items behind it."""

    value: float
    low: float
    high: float
    n: int

    @property
    def covers_zero(self) -> bool:
        """True when the interval contains 0: for a difference, 'inside the noise'."""
        return bool(self.low <= 0 <= self.high)

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


def _arrays(samples: Sequence[Sequence[float]]) -> list[np.ndarray]:
    """The samples as float arrays of one common length, at least one item each."""
    arrays = [np.asarray(s, dtype=float) for s in samples]
    if not arrays or any(a.ndim != 1 for a in arrays) or len({len(a) for a in arrays}) != 1 or not len(arrays[0]):
        raise InputError(f"need paired 1-D samples of one length >= 1, got shapes {[a.shape for a in arrays]}",
                         field="samples")
    return arrays


def bootstrap(statistic: Callable[..., float], *samples: Sequence[float], confidence: float = CONFIDENCE,
              resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """`statistic(*samples, axis=-1)` with its bootstrap interval, the samples resampled together (paired by index).

    `statistic` must be vectorised like numpy reductions: it reduces along `axis`.
    """
    from scipy.stats import bootstrap as scipy_bootstrap

    arrays = _arrays(samples)
    value = float(statistic(*arrays, axis=-1))
    if len(arrays[0]) < 2 or all(np.all(a == a[0]) for a in arrays):
        return Interval(value, value, value, len(arrays[0]))  # nothing to resample: no spread
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa's degenerate-distribution warning: the percentile fallback follows
            result = scipy_bootstrap(tuple(arrays), statistic, paired=True, vectorized=True, method=method,
                                     confidence_level=confidence, n_resamples=resamples,
                                     rng=np.random.default_rng(seed))
        low, high = result.confidence_interval
        if np.isfinite(low) and np.isfinite(high):
            return Interval(value, float(low), float(high), len(arrays[0]))
    return Interval(value, float("nan"), float("nan"), len(arrays[0]))


def _mean_difference(base: np.ndarray, other: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(other, axis=axis) - np.mean(base, axis=axis)


def mean_interval(values: Sequence[float], **kwargs) -> Interval:
    """The mean of per-item values with its interval."""
    return bootstrap(np.mean, values, **kwargs)


def paired_mean_difference(base: Sequence[float], other: Sequence[float], **kwargs) -> Interval:
    """mean(other) - mean(base) over the same items, with its paired interval."""
    return bootstrap(_mean_difference, base, other, **kwargs)


def perplexity(nll_sums: Sequence[float], n_tokens: Sequence[float], axis: int = -1) -> np.ndarray:
    """exp(total NLL / total tokens) over windows (or texts), along `axis`."""
    return np.exp(np.sum(nll_sums, axis=axis) / np.sum(n_tokens, axis=axis))


def _perplexity_difference(base_nll: np.ndarray, other_nll: np.ndarray, n_tokens: np.ndarray,
                           axis: int = -1) -> np.ndarray:
    return perplexity(other_nll, n_tokens, axis) - perplexity(base_nll, n_tokens, axis)


def perplexity_interval(nll_sums: Sequence[float], n_tokens: Sequence[float], **kwargs) -> Interval:
    """Corpus perplexity with its interval, resampling whole windows."""
    return bootstrap(perplexity, nll_sums, n_tokens, **kwargs)


def paired_perplexity_difference(base_nll: Sequence[float], other_nll: Sequence[float], n_tokens: Sequence[float],
                                 **kwargs) -> Interval:
    """perplexity(other) - perplexity(base) on the same windows, with its paired interval."""
    return bootstrap(_perplexity_difference, base_nll, other_nll, n_tokens, **kwargs)


def _relative_change(base: np.ndarray, other: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(other, axis=axis) / np.mean(base, axis=axis) - 1


def paired_relative_change(base: Sequence[float], other: Sequence[float], **kwargs) -> Interval:
    """mean(other) / mean(base) - 1 over the same items (a toxicity change), with its paired interval."""
    return bootstrap(_relative_change, base, other, **kwargs)


def _perplexity_ratio(base_nll: np.ndarray, other_nll: np.ndarray, n_tokens: np.ndarray,
                      axis: int = -1) -> np.ndarray:
    return perplexity(other_nll, n_tokens, axis) / perplexity(base_nll, n_tokens, axis) - 1


def paired_perplexity_change(base_nll: Sequence[float], other_nll: Sequence[float], n_tokens: Sequence[float],
                             **kwargs) -> Interval:
    """perplexity(other) / perplexity(base) - 1 on the same windows, with its paired interval."""
    return bootstrap(_perplexity_ratio, base_nll, other_nll, n_tokens, **kwargs)
