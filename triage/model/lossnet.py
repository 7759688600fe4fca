"""Loss prediction module (Yoo & Kweon, "Learning Loss for Active Learning", CVPR 2019).

Each backbone stage's feature map is global-average-pooled, passed through a
linear layer of `width` units and a ReLU; the results are concatenated and one
linear layer predicts the (log-scale free) target loss of the sample. It is
trained with a pairwise margin ranking loss, so only the order of its outputs
is meaningful.
"""

from collections.abc import Sequence

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

    def predict(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """`forward` for scoring, without autograd: predicted loss [N].

        The per-stage linear layers run as one product with their block-diagonal
        weight: on a single study the per-call overhead of a dozen small torch calls is
        most of the cost. The fused weight is rebuilt whenever a parameter changed (an
        optimizer step, `load_state_dict`, a move), so it always follows `forward`.
        """
        if len(maps) != len(self.branches):
            raise ValueError(f"maps must hold {len(self.branches)} stage maps, got {len(maps)}")
        weight, bias = self._fused()
        with torch.no_grad():
            # sum, then divide by h*w: bit-identical to `mean` over (h, w), and a small
            # CPU sum costs about half a mean
            pooled = torch.cat([m.sum(dim=(2, 3)) / (m.shape[2] * m.shape[3]) for m in maps],
                               dim=1)  # fmt: skip
            hidden = torch.relu(torch.addmm(bias, pooled, weight))
            return torch.addmm(self.out.bias, hidden, self.out.weight.T).squeeze(1)

    def _fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        linears = [branch[0] for branch in self.branches]
        params = [p for layer in linears for p in (layer.weight, layer.bias)]
        stamp = [p._version for p in params] + [p.data_ptr() for p in params]
        cached = self.__dict__.get("_fused_cache")
        if cached is None or cached[0] != stamp:
            with torch.no_grad():
                weight = torch.block_diag(*[layer.weight.T for layer in linears]).contiguous()
                bias = torch.cat([layer.bias for layer in linears])
            cached = (stamp, weight, bias)
            self.__dict__["_fused_cache"] = cached  # plain attribute: not a parameter
        return cached[1], cached[2]


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
