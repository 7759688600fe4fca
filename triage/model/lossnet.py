"""Loss prediction module (Yoo & Kweon, "Learning Loss for Active Learning", CVPR 2019).

Each backbone stage's feature map is global-average-pooled, passed through a
linear layer of `width` units and a ReLU; the results are concatenated and one
linear layer predicts the (log-scale free) target loss of the sample. It is
trained with a pairwise margin ranking loss, so only the order of its outputs
is meaningful.
"""

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from triage.model.settings import ModelSettings


class LossPredictor(nn.Module):
    """Predicts each sample's classification loss from backbone stage features.

    Args:
        stage_channels: Channels of each stage's feature map, in stage order.
        width: Units of the per-stage linear layer (128 in the paper).
    """

    def __init__(self, stage_channels: Sequence[int], width: int = 128) -> None:
        super().__init__()
        if len(stage_channels) < 1:
            raise ValueError("stage_channels must list at least one stage")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Linear(c, width), nn.ReLU()) for c in stage_channels
        )
        self.out = nn.Linear(width * len(stage_channels), 1)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Predicted loss [N] from stage maps [N, C_i, h_i, w_i] (one per stage)."""
        if len(maps) != len(self.branches):
            raise ValueError(f"maps must hold {len(self.branches)} stage maps, got {len(maps)}")
        # functional calls: module-call overhead would dominate on single studies
        pooled = [
            F.relu(F.linear(m.mean(dim=(2, 3)), branch[0].weight, branch[0].bias))
            for branch, m in zip(self.branches, maps, strict=True)
        ]
        return F.linear(torch.cat(pooled, dim=1), self.out.weight, self.out.bias).squeeze(1)

    def predict(self, maps: Sequence[torch.Tensor]) -> np.ndarray:
        """`forward` without autograd, in numpy, for scoring: [N] float32.

        On a single study the dozen torch calls of `forward` cost about 0.1 ms of
        per-call overhead; the same arithmetic on numpy views of the same tensors costs a
        fraction of that. The weights are read at each call, so a model trained further
        predicts with its current weights.
        """
        if len(maps) != len(self.branches):
            raise ValueError(f"maps must hold {len(self.branches)} stage maps, got {len(maps)}")
        with torch.no_grad():
            hidden = [
                np.maximum(_np(m).mean(axis=(2, 3)) @ _np(branch[0].weight).T
                           + _np(branch[0].bias), 0.0)
                for branch, m in zip(self.branches, maps, strict=True)
            ]  # fmt: skip
            out = np.concatenate(hidden, axis=1) @ _np(self.out.weight)[0] + _np(self.out.bias)
        return out.astype(np.float32, copy=False)


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().numpy()


def build_loss_predictor(settings: ModelSettings) -> LossPredictor:
    """The loss predictor matching `build_network(settings)`'s stages."""
    return LossPredictor(settings.channels, width=settings.lossnet_width)


def ranking_loss(
    predicted: torch.Tensor, target: torch.Tensor, margin: float = 1.0
) -> torch.Tensor:
    """Pairwise margin ranking loss of Yoo & Kweon.

    Sample i of the first half of the batch is paired with sample i of the second
    half (an odd last sample is left out). With sign s = +1 if the true loss of the
    first is larger, else -1, the pair costs max(0, margin - s * (p_i - p_j)).

    Args:
        predicted: Predicted losses [B].
        target: True per-sample losses [B]; gradients are not taken through it.
        margin: Ranking margin (>= 0).

    Returns:
        Scalar mean over pairs (0 when B < 2).
    """
    if predicted.shape != target.shape or predicted.ndim != 1:
        raise ValueError(
            f"predicted and target must both be [B], got {tuple(predicted.shape)} "
            f"and {tuple(target.shape)}"
        )
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    half = predicted.shape[0] // 2
    if half == 0:
        return predicted.sum() * 0.0
    target = target.detach()
    diff_pred = predicted[:half] - predicted[half : 2 * half]
    sign = torch.sign(target[:half] - target[half : 2 * half])
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return torch.clamp(margin - sign * diff_pred, min=0).mean()
