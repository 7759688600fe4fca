"""Monte-Carlo dropout that runs the deterministic trunk once.

Classic MC dropout runs the whole network T times. Here the network is split at
the MC scope (`head`, `last_block` or `full`, see `TriageNet`): the trunk runs
once in eval mode, its output is repeated T times along the batch axis and the
stochastic part runs once on that [T*N, ...] tensor with dropout on and
BatchNorm in eval mode. `full` repeats the input itself, i.e. the classic
method batched, for comparison.
"""

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from triage.model.network import MC_SCOPES, TriageNet
from triage.model.settings import McScope


def _set_training(module: nn.Module, flag: bool) -> None:
    # plain attribute write: nn.Module.__setattr__ and .train() cost microseconds per module
    object.__setattr__(module, "training", flag)


@contextlib.contextmanager
def mc_dropout_mode(
    model: nn.Module,
    sampled: Iterable[nn.Module],
    all_modules: Sequence[nn.Module] | None = None,
) -> Iterator[None]:
    """Put `model` in eval mode except the dropout layers inside `sampled`.

    BatchNorm (and everything else) runs in eval mode; only `nn.Dropout*` layers
    that are `sampled` or inside a `sampled` module are switched to training
    mode. On exit, normal or by exception, every submodule's `training` flag is
    restored to what it was on entry, provided the body restores what it changes
    itself (as `mc_predict` does). Only the flags that change are written: a scoring
    model is already in eval mode, and walking its every module twice per study cost
    more than its MC head.

    Args:
        model: The module whose modes are changed.
        sampled: Submodules whose dropout layers are sampled.
        all_modules: `list(model.modules())` if the caller has it already (saves the walk).
    """
    modules = list(model.modules()) if all_modules is None else all_modules
    lowered = [module for module in modules if module.training]
    dropouts = [module for part in sampled for module in part.modules()
                if isinstance(module, nn.modules.dropout._DropoutNd)]  # fmt: skip
    try:
        for module in lowered:
            _set_training(module, False)
        with _sampling(dropouts):
            yield
    finally:
        for module in lowered:
            _set_training(module, True)


@contextlib.contextmanager
def _sampling(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Dropout `layers` in training mode (sampling masks) inside the block, and back in
    eval mode after it, normal or by exception."""
    try:
        for layer in layers:
            _set_training(layer, True)
        yield
    finally:
        for layer in layers:
            _set_training(layer, False)


@dataclass(frozen=True)
class McOutput:
    """Result of one batched MC dropout pass.

    Attributes:
        probs: Softmax probabilities of each sample, [T, N, C].
        stage_maps: Deterministic feature map of every stage ([N, C_i, h_i, w_i]), for
            the loss predictor; empty when `with_features` was False.
        trunk_seconds: Wall time of the deterministic part (including, outside the
            `head` scope, one deterministic pass of the later stages for the features).
        mc_seconds: Wall time of the T-times batched stochastic part.
        pooled: Deterministic pooled features [N, F] (the last layer's input), when
            `with_pooled` was True; else None.
    """

    probs: torch.Tensor
    stage_maps: list[torch.Tensor]
    trunk_seconds: float
    mc_seconds: float
    pooled: torch.Tensor | None = None


def mc_predict(
    net: TriageNet,
    images: torch.Tensor,
    *,
    samples: int = 20,
    scope: McScope = "head",
    with_features: bool = True,
    seed: int | None = None,
    temperature: float = 1.0,
    with_pooled: bool = False,
) -> McOutput:
    """MC dropout predictions of `images` with the trunk run once.

    Args:
        net: The classifier.
        images: Float tensor [N, 1, S, S] scaled to [0, 1].
        samples: Number of MC samples T (>= 1).
        scope: Stochastic part: `head`, `last_block` or `full`.
        with_features: Also return deterministic stage feature maps (for the loss
            predictor).
        seed: If given, dropout masks are drawn from this seed without disturbing the
            global torch RNG; otherwise from the global RNG.
        temperature: The logits are divided by it before the softmax (the model's
            calibration, `triage.model.calibration.OperatingPoint`).
        with_pooled: Also return the deterministic pooled features (free at `head`
            scope; one deterministic pass of the later stages otherwise).

    Returns:
        An `McOutput` with probabilities [T, N, C].
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if scope not in MC_SCOPES:
        raise ValueError(f"scope must be one of {MC_SCOPES}, got {scope!r}")
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, S, S], got shape {tuple(images.shape)}")
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with torch.inference_mode(), rng:
        if seed is not None:
            # the CPU generator only: `torch.manual_seed` also seeds every other device
            # backend, about 0.25 ms a call, more than this whole MC head
            torch.default_generator.manual_seed(seed)
        start = time.perf_counter()
        with mc_dropout_mode(net, (), net.all_modules):
            z, maps = net.trunk(images, scope)
            rest = net.rest_features(z, scope) if with_features or with_pooled else []
            maps = maps + rest if with_features else []
            pooled = None
            if with_pooled:
                pooled = z if scope == "head" else net.pool(rest[-1])
            trunk_done = time.perf_counter()
            with _sampling(net.dropout_layers(scope)):  # the mode restores only its own
                repeated = z.repeat(samples, *([1] * (z.ndim - 1)))
                logits = net.stochastic(repeated, scope)
        probs = torch.softmax(logits / temperature, dim=-1).view(samples, images.shape[0], -1)
        mc_done = time.perf_counter()
    return McOutput(
        probs=probs,
        stage_maps=maps,
        trunk_seconds=trunk_done - start,
        mc_seconds=mc_done - trunk_done,
        pooled=pooled,
    )
