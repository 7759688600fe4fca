"""Input validation and chunked squared-Euclidean distances shared by the core-set selectors.

All distances are computed as ``||a||^2 + ||b||^2 - 2 a.b`` with matrix products in torch and
clamped at 0, so no routine here ever materialises more than a ``[chunk_size, m]`` block.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_CHUNK_SIZE = 16_384
"""Rows of ``features`` per distance block (block memory is ``chunk_size * m`` floats)."""

_DTYPES = (torch.float32, torch.float64)


def as_features(
    features: torch.Tensor | np.ndarray,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> torch.Tensor:
    """Validates ``features`` and returns them as a contiguous 2-D tensor.

    Args:
        features: Tensor or ndarray, shape ``[n, d]``, finite real values.
        dtype: ``torch.float32`` or ``torch.float64``; the computation dtype.
        device: Target device; ``None`` keeps a tensor's device (CPU for ndarrays).

    Returns:
        Tensor ``[n, d]`` of ``dtype`` on ``device`` (no copy when already conforming).

    Raises:
        ValueError: If ``dtype`` is unsupported, or ``features`` is not a non-empty finite 2-D
            array.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if isinstance(features, np.ndarray):
        if not np.issubdtype(features.dtype, np.number) or np.iscomplexobj(features):
            raise ValueError(f"features must be real numeric, got dtype {features.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(features))
    elif isinstance(features, torch.Tensor):
        if features.is_complex() or features.dtype == torch.bool:
            raise ValueError(f"features must be real numeric, got dtype {features.dtype}")
        x = features.detach()
    else:
        raise ValueError(f"features must be a torch.Tensor or numpy.ndarray, got {type(features)}")
    if x.ndim != 2:
        raise ValueError(f"features must have shape [n, d], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"features must be non-empty, got shape {tuple(x.shape)}")
    x = x.to(device=device if device is not None else x.device, dtype=dtype).contiguous()
    if not all(bool(torch.isfinite(c).all()) for c in x.split(DEFAULT_CHUNK_SIZE)):
        raise ValueError("features must be finite (found NaN or inf)")
    return x


def sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared row norms ``[n]`` of ``x [n, d]``, in row chunks (no ``[n, d]`` temporary)."""
    return torch.cat([(c * c).sum(dim=1) for c in x.split(DEFAULT_CHUNK_SIZE)])


def as_indices(indices: Sequence[int] | np.ndarray | torch.Tensor, n: int, name: str) -> np.ndarray:
    """Validates a list of point indices.

    Args:
        indices: Integer indices into ``[0, n)``, shape ``[m]``; no duplicates.
        n: Number of points.
        name: Parameter name used in error messages.

    Returns:
        ``np.ndarray`` of int64, shape ``[m]``, in the given order.

    Raises:
        ValueError: If not 1-D integers in range, or if there are duplicates.
    """
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    arr = np.asarray(indices)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D sequence of integer indices, got {arr.dtype}"
                         f" with shape {arr.shape}")
    arr = arr.astype(np.int64)
    if arr.min() < 0 or arr.max() >= n:
        raise ValueError(f"{name} must lie in [0, {n}), got range [{arr.min()}, {arr.max()}]")
    if np.unique(arr).size != arr.size:
        raise ValueError(f"{name} contains duplicate indices")
    return arr


def check_chunk_size(chunk_size: int) -> None:
    """Raises ValueError unless ``chunk_size`` is a positive int."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def check_count(value: int, name: str, upper: int, upper_desc: str) -> None:
    """Raises ValueError unless ``0 <= value <= upper`` and ``value`` is an int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if value > upper:
        raise ValueError(f"{name} must be <= {upper_desc} = {upper}, got {value}")


def sq_dists(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor
             ) -> torch.Tensor:
    """Squared Euclidean distances ``[len(a), len(b)]`` by one matrix product, clamped >= 0.

    Args:
        a: Points ``[p, d]``.
        a_sq: Their squared norms ``[p]``.
        b: Points ``[q, d]``.
        b_sq: Their squared norms ``[q]``.
    """
    out = torch.addmm(a_sq[:, None], a, b.T, beta=1.0, alpha=-2.0)
    return out.add_(b_sq[None, :]).clamp_(min=0.0)


def update_min(
    x: torch.Tensor,
    x_sq: torch.Tensor,
    centres: torch.Tensor,
    best: torch.Tensor,
    assign: torch.Tensor,
    chunk_size: int,
    block: int = 256,
) -> None:
    """In place: lowers ``best``/``assign`` with the distances to ``centres``.

    Points whose ``best`` is negative (a sentinel for centres and ignored points) are never
    changed. On equal distance the earlier centre (lower position in ``centres``, or the one
    already recorded) wins.

    Args:
        x: All points ``[n, d]``.
        x_sq: Squared norms ``[n]``.
        centres: Indices of centre points, int64 ``[m]`` on ``x.device``.
        best: Squared distance to the nearest centre so far, ``[n]``, updated in place.
        assign: Index (into ``x``) of that centre, int64 ``[n]``, updated in place.
        chunk_size: Rows of ``x`` per distance block.
        block: Centres per block; memory is ``chunk_size * block`` floats.
    """
    for c0 in range(0, centres.numel(), block):
        cidx = centres[c0:c0 + block]
        c, c_sq = x[cidx], x_sq[cidx]
        for r0 in range(0, x.shape[0], chunk_size):
            d2 = sq_dists(x[r0:r0 + chunk_size], x_sq[r0:r0 + chunk_size], c, c_sq)
            arg = torch.argmin(d2, dim=1)
            dmin = d2.gather(1, arg[:, None]).squeeze(1)
            cur = best[r0:r0 + chunk_size]
            upd = dmin < cur
            cur.copy_(torch.where(upd, dmin, cur))
            a = assign[r0:r0 + chunk_size]
            a.copy_(torch.where(upd, cidx[arg], a))
