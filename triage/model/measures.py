"""Uncertainty measures of class probabilities, vectorised and pure.

Shapes: `probs` is [..., C] for measures of one predictive distribution (a
study's mean MC probabilities [N, C] or a single [C]); `samples` is [T, ..., C]
for measures that need the MC samples (T samples first). Every function returns
the shape of its input without the class axis (and without T). Logarithms are
base 2, so entropies are in bits. Inputs may be torch tensors or numpy arrays;
the output has the same type. The module does not import torch itself (the gate's
settings load without it): a tensor can only come from a caller that has.
"""

import sys
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch

    Array = TypeVar("Array", torch.Tensor, np.ndarray)
else:
    Array = TypeVar("Array")

MEASURES: tuple[str, ...] = (
    "entropy", "bald", "variation_ratio", "least_confidence", "margin", "vote_entropy",
)
"""All measures. All grow with uncertainty except `margin`, which shrinks."""

_TINY = 1e-12


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _xlog2x(p: Array) -> Array:
    if _is_tensor(p):
        import torch

        return torch.where(p > 0, p * torch.log2(p.clamp_min(_TINY)), torch.zeros_like(p))
    return np.where(p > 0, p * np.log2(np.maximum(p, _TINY)), 0.0)


def _check(probs: Array, name: str, min_ndim: int) -> None:
    if not (isinstance(probs, np.ndarray) or _is_tensor(probs)):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(probs)}")
    if probs.ndim < min_ndim or probs.shape[-1] < 2:
        raise ValueError(
            f"{name} must have >= {min_ndim} axes and >= 2 classes, got {tuple(probs.shape)}"
        )


def predictive_entropy(probs: Array) -> Array:
    """Entropy in bits of probabilities [..., C] -> [...]; 0 to log2(C)."""
    _check(probs, "probs", 1)
    return -_xlog2x(probs).sum(-1)


def least_confidence(probs: Array) -> Array:
    """1 - max_c p_c of probabilities [..., C] -> [...]; 0 to 1 - 1/C."""
    _check(probs, "probs", 1)
    top = probs.max(-1) if isinstance(probs, np.ndarray) else probs.max(-1).values
    return 1.0 - top


def margin(probs: Array) -> Array:
    """Top-1 minus top-2 probability of [..., C] -> [...]; small = uncertain."""
    _check(probs, "probs", 1)
    if _is_tensor(probs):
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    top2 = np.sort(probs, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def bald(samples: Array) -> Array:
    """BALD mutual information in bits of MC samples [T, ..., C] -> [...].

    H(mean_t p_t) - mean_t H(p_t): the part of the predictive entropy that comes
    from disagreement between samples; 0 when all samples agree.
    """
    _check(samples, "samples", 2)
    total = predictive_entropy(samples.mean(0))
    expected = predictive_entropy(samples).mean(0)
    result = total - expected
    if _is_tensor(result):
        return result.clamp_min(0.0)
    return np.maximum(result, 0.0)


def _votes(samples: Array) -> Array:
    """Members voting for each class (their argmax) in samples [T, ..., C] -> [..., C]."""
    num_classes = samples.shape[-1]
    if _is_tensor(samples):
        import torch

        votes = torch.nn.functional.one_hot(samples.argmax(-1), num_classes).sum(0)
        return votes.to(samples.dtype)
    return (samples.argmax(-1)[..., None] == np.arange(num_classes)).sum(0)


def variation_ratio(samples: Array) -> Array:
    """1 - (share of MC samples voting for the modal class), [T, ..., C] -> [...]."""
    _check(samples, "samples", 2)
    votes = _votes(samples)
    top = votes.max(-1) if isinstance(votes, np.ndarray) else votes.max(-1).values
    return 1.0 - top / samples.shape[0]


def vote_entropy(samples: Array) -> Array:
    """Vote entropy in bits of a committee's samples [T, ..., C] -> [...] (Dagan &
    Engelson 1995): the entropy of the shares of members whose most likely class is
    each class. 0 when every member votes alike, however unsure each one is; at most
    log2(min(T, C)). It counts votes only: two classes split 50/50 among the members
    give 1 bit whether the members are certain or barely past 0.5."""
    _check(samples, "samples", 2)
    return predictive_entropy(_votes(samples) / samples.shape[0])


def all_measures(samples: Array) -> dict[str, Array]:
    """Every measure of `MEASURES` from MC samples [T, ..., C], each [...].

    The single-distribution measures use the MC mean probabilities.
    """
    _check(samples, "samples", 2)
    mean = samples.mean(0)
    total = predictive_entropy(mean)
    mutual = total - predictive_entropy(samples).mean(0)
    if _is_tensor(mutual):
        mutual = mutual.clamp_min(0.0)
    else:
        mutual = np.maximum(mutual, 0.0)
    shares = _votes(samples) / samples.shape[0]  # counted once for both vote measures
    top = shares.max(-1) if isinstance(shares, np.ndarray) else shares.max(-1).values
    return {
        "entropy": total,
        "bald": mutual,
        "variation_ratio": 1.0 - top,
        "least_confidence": least_confidence(mean),
        "margin": margin(mean),
        "vote_entropy": predictive_entropy(shares),
    }
