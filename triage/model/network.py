"""The classifier: a small 2D residual CNN built from MONAI blocks.

The network is a stack of MONAI `ResidualUnit` stages (stride 2 each, or 1 where
`ModelSettings.strides` says so), global average
pooling, dropout and a linear layer. It exposes what MC dropout and the loss
predictor need:

* `forward_with_features(x)` returns the logits and every stage's feature map;
* `trunk(x, scope)` / `stochastic(z, scope)` split the forward pass at the MC scope
  into a deterministic part, run once, and a stochastic part, run T times.
"""

from collections.abc import Sequence

import torch
from monai.networks.blocks import ResidualUnit
from torch import nn

from triage.model.settings import McScope, ModelSettings

MC_SCOPES: tuple[str, ...] = ("head", "last_block", "full")


class TriageNet(nn.Module):
    """Residual CNN classifier with a trunk/stochastic split.

    Args:
        in_channels: Input channels (1 for grey-scale radiographs).
        num_classes: Number of output classes (>= 2).
        channels: Output channels of each stage.
        subunits: Convolutions per residual stage.
        dropout: Dropout probability before the linear layer.
        block_dropout: Dropout probability inside every stage.
        strides: Stride of each stage (default 2 each).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: Sequence[int],
        subunits: int = 2,
        dropout: float = 0.5,
        block_dropout: float = 0.1,
        strides: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if len(channels) < 2:
            raise ValueError(f"channels must list two or more stages, got {list(channels)}")
        strides = tuple(strides) if strides is not None else (2,) * len(channels)
        if len(strides) != len(channels):
            raise ValueError(f"strides must match channels, got {list(strides)}")
        stages = []
        previous = in_channels
        for out, stride in zip(channels, strides, strict=True):
            stages.append(
                ResidualUnit(
                    spatial_dims=2,
                    in_channels=previous,
                    out_channels=out,
                    strides=stride,
                    subunits=subunits,
                    act="RELU",
                    norm="BATCH",
                    dropout=block_dropout if block_dropout > 0 else None,
                )
            )
            previous = out
        self.stages = nn.ModuleList(stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head_dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(previous, num_classes)
        self.stage_channels: tuple[int, ...] = tuple(channels)
        self.num_classes = num_classes
        # the module tree is fixed after construction: walk it once (MC mode switching
        # would otherwise spend a tenth of a millisecond per study walking it)
        self.all_modules: tuple[nn.Module, ...] = tuple(self.modules())

    def _split_index(self, scope: McScope) -> int:
        """Index of the first stage inside the stochastic part."""
        if scope == "head":
            return len(self.stages)
        if scope == "last_block":
            return len(self.stages) - 1
        if scope == "full":
            return 0
        raise ValueError(f"scope must be one of {MC_SCOPES}, got {scope!r}")

    def stochastic_modules(self, scope: McScope) -> list[nn.Module]:
        """Modules whose dropout is sampled at the given MC scope."""
        return [*self.stages[self._split_index(scope) :], self.head_dropout]

    def dropout_layers(self, scope: McScope) -> list[nn.Module]:
        """The dropout layers sampled at the given MC scope."""
        if scope == "head":
            return [self.head_dropout]
        return [
            module
            for part in self.stochastic_modules(scope)
            for module in part.modules()
            if isinstance(module, nn.modules.dropout._DropoutNd)
        ]

    def trunk(self, x: torch.Tensor, scope: McScope) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Deterministic part of the forward pass.

        Args:
            x: Images, float [N, 1, S, S] in [0, 1].
            scope: MC scope deciding where the trunk ends.

        Returns:
            `(z, maps)`: the input of `stochastic` (pooled features [N, F] for `head`,
            a feature map [N, C, h, w] for `last_block`, `x` itself for `full`) and the
            feature maps of the stages the trunk ran.
        """
        stop = self._split_index(scope)
        maps: list[torch.Tensor] = []
        for stage in self.stages[:stop]:
            x = stage(x)
            maps.append(x)
        if scope == "head":
            return self.pool(x), maps
        return x, maps

    def stochastic(self, z: torch.Tensor, scope: McScope) -> torch.Tensor:
        """Stochastic part of the forward pass: `z` from `trunk` to logits [N, C]."""
        start = self._split_index(scope)
        if scope != "head":
            for stage in self.stages[start:]:
                z = stage(z)
            z = self.pool(z)
        return self.fc(self.head_dropout(z))

    def rest_features(self, z: torch.Tensor, scope: McScope) -> list[torch.Tensor]:
        """Feature maps of the stages after the trunk, for one (deterministic) pass."""
        maps: list[torch.Tensor] = []
        if scope == "head":
            return maps
        for stage in self.stages[self._split_index(scope) :]:
            z = stage(z)
            maps.append(z)
        return maps

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits [N, C] and the feature map of every stage ([N, C_i, h_i, w_i])."""
        z, maps = self.trunk(x, "head")
        return self.stochastic(z, "head"), maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, C] for images [N, 1, S, S]."""
        return self.forward_with_features(x)[0]


def build_network(settings: ModelSettings) -> TriageNet:
    """Build the (untrained) classifier described by `settings`.

    Args:
        settings: Model settings; `labels` gives the number of classes and `channels`,
            `subunits`, `dropout`, `block_dropout` the architecture.

    Returns:
        A `TriageNet` for inputs [N, 1, input_size, input_size] in [0, 1].
    """
    return TriageNet(
        in_channels=1,
        num_classes=len(settings.labels),
        channels=settings.channels,
        subunits=settings.subunits,
        dropout=settings.dropout,
        block_dropout=settings.block_dropout,
        strides=settings.stage_strides,
    )
