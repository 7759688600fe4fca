"""Data-parallel training steps: one process's share of each batch of `fit`.

With `Shard` passed to `triage.model.training.fit`, every process of a
``torch.distributed`` group runs the same `fit`: the same seeded sample and
augmentation of each global batch of `batch_size` images, of which this process
trains on positions ``rank::world``, through a `DistributedDataParallel` wrapper of the
classifier and its loss predictor together (one module, one gradient all-reduce per
step). The losses are scaled so that the averaged gradient is that of the one-process
loss on the whole batch:

* cross-entropy: each process sums its per-sample losses over the global batch size;
* ranking loss: the strided slices keep the one-process pairs (position i with i + B/2)
  whenever B is a multiple of 2 x world, and each process weighs its pairs by its share
  of all pairs;
* batch normalisation: the batch statistics are the global batch's, all-reduced across
  the processes in the forward pass and differentiated through (`torch.nn.SyncBatchNorm`
  does this on GPUs only; this is the same computation for any backend), so the
  running statistics are the ones one process would keep, equal on every process.

Every process augments the whole global batch (so the random draws are one process's)
and then keeps its slice. What differs from one process is the dropout masks (each
process seeds its own); with dropout off, a step's averaged gradient is the one-process
gradient up to float rounding (tests/training/test_distributed_step.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from triage.model.lossnet import LossPredictor, ranking_loss
from triage.model.network import TriageNet


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel run (an initialised process group).

    Attributes:
        rank: Rank of this process (0 leads: it alone evaluates and writes).
        world: Number of processes.
        device: Device the modules train on (CPU with gloo, ``cuda:<local rank>`` with
            NCCL).
        group: The process group (None: the default one).
    """

    rank: int
    world: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: dist.ProcessGroup | None = None

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def mine(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global batch: positions ``rank::world``."""
        return batch[self.rank :: self.world]

    def pairs(self, size: int) -> int:
        """Ranking pairs of all processes together in a global batch of `size` images."""
        return sum(len(range(r, size, self.world)) // 2 for r in range(self.world))

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the processes, in place; returns it."""
        dist.all_reduce(tensor, group=self.group)
        return tensor

    @contextlib.contextmanager
    def wrap(self, net: TriageNet, loss_predictor: LossPredictor) -> Iterator[nn.Module]:
        """The classifier and the loss predictor as one `DistributedDataParallel` module,
        called ``(images, detach) -> (logits, predicted loss)``, with global-batch
        normalisation; on exit the modules are plain again (same parameters)."""
        layers = [m for m in net.modules() if isinstance(m, _BatchNorm)]
        for layer in layers:  # an instance attribute: shadows the class's forward
            layer.forward = partial(_global_batch_norm, layer, self.group)
        try:
            joint = _Joint(net, loss_predictor)
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # buffers: synced at the start; the global statistics keep them equal, so
            # rank 0 need not broadcast them before every step
            ddp = DistributedDataParallel(joint, device_ids=device_ids,
                                          forward_sync_buffers=False, process_group=self.group)
            try:
                yield ddp
            finally:
                del ddp  # its reducer's hooks go with it
        finally:
            for layer in layers:
                del layer.forward

    def step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             weight: torch.Tensor | None, detach: bool, margin: float, ranking_weight: float
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                        torch.Tensor]:  # fmt: skip
        """Forward this process's slice of a global batch through `model` (from `wrap`).

        Args:
            model: The wrapped modules.
            x: The global batch, augmented [B, 1, S, S] (every process holds it whole).
            y: Its labels [B].
            weight: Class weights of the cross-entropy, or None.
            detach: Detach the loss predictor's input features.
            margin: Ranking margin.
            ranking_weight: Weight of the ranking loss.

        Returns:
            The objective to call `backward` on (scaled so that DDP's gradient average is
            the gradient of the global batch's loss), this process's shares of the global
            (loss, cross-entropy, ranking loss) (their sums over the processes are the
            one-process values), and whether each of its images was classified correctly.
        """
        size = x.shape[0]
        xs, ys = self.mine(x), self.mine(y)
        logits, predicted = model(xs, detach)
        per_sample = F.cross_entropy(logits, ys, weight=weight, reduction="none")
        ce = per_sample.sum() / size
        pairs = self.pairs(size)
        rank = ranking_loss(predicted, per_sample, margin)
        rank = rank * (xs.shape[0] // 2 / pairs) if pairs else rank * 0.0
        loss = ce + ranking_weight * rank
        correct = logits.detach().argmax(dim=1) == ys
        return loss * self.world, (loss, ce, rank), correct


class _Joint(nn.Module):
    """Classifier and loss predictor as one module, for one DDP wrapper: the loss
    predictor reads the classifier's intermediate feature maps of the same forward."""

    def __init__(self, net: TriageNet, loss_predictor: LossPredictor) -> None:
        super().__init__()
        self.net = net
        self.loss_predictor = loss_predictor

    def forward(self, x: torch.Tensor, detach: bool) -> tuple[torch.Tensor, torch.Tensor]:
        logits, maps = self.net.forward_with_features(x)
        if detach:
            maps = [m.detach() for m in maps]
        return logits, self.loss_predictor(maps)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes, differentiable: the gradient is summed too (every process's
    loss depends on every process's inputs through the shared statistics)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _global_batch_norm(layer: _BatchNorm, group: dist.ProcessGroup | None,
                       x: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """`layer` in training mode with the statistics of the global batch (the union of
    every process's slice), in float64; its running statistics updated as one process
    would. Evaluation mode is the layer's own."""
    if not layer.training:
        return type(layer).forward(layer, x)
    dims = [0, *range(2, x.dim())]
    channels = x.shape[1]
    local = torch.cat([x.sum(dims, dtype=torch.float64),
                       (x * x).sum(dims, dtype=torch.float64),
                       x.new_full((1,), x.numel() // channels, dtype=torch.float64)])
    total = _AllReduceSum.apply(local, group)
    count = total[2 * channels]
    mean = total[:channels] / count
    var = (total[channels : 2 * channels] / count - mean * mean).clamp_min(0.0)
    scale = torch.rsqrt(var + layer.eps)
    if layer.weight is not None:
        scale = scale * layer.weight
    shift = -mean * scale
    if layer.bias is not None:
        shift = shift + layer.bias
    shape = (1, channels) + (1,) * (x.dim() - 2)
    out = x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)
    if layer.track_running_stats and layer.running_mean is not None:
        with torch.no_grad():
            layer.num_batches_tracked.add_(1)
            factor = (layer.momentum if layer.momentum is not None
                      else 1.0 / float(layer.num_batches_tracked))
            n = float(count)
            unbiased = var.detach() * (n / max(n - 1.0, 1.0))
            layer.running_mean.mul_(1 - factor).add_(factor * mean.detach().to(x.dtype))
            layer.running_var.mul_(1 - factor).add_(factor * unbiased.to(x.dtype))
    return out
