"""A data-parallel `fit` (triage.model.parallel) against one process, in real processes.

Two processes (torch.multiprocessing spawn, gloo over a file rendezvous in tmp_path, so
concurrent tests never share a port) each train on half of every global batch; rank 0's
modules are compared with one process's on the same batches. Dropout is off (its masks
are each process's own); the augmentation is on (every process draws it for the whole
batch).

Tolerance: 1e-5, absolute. One step: the averaged gradient (measured: within 2e-7 of
one process's), the batch-norm running statistics, the loss records, and every weight
whose gradient is above noise (|g| > 1e-6). Below that, AdamW's first step,
lr * g / (|g| + 1e-8), turns rounding noise into a step of up to the learning rate in
either direction; such gradients are those of the biases of convolutions feeding a batch
normalisation (zero in exact arithmetic: the normalisation subtracts the bias) and of
dead ReLU units. After several steps, the loss records and the weights but those biases
and the running means (which follow them); the network's function does not depend on
those biases.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from triage.model.lossnet import build_loss_predictor
from triage.model.network import build_network
from triage.model.parallel import Shard
from triage.model.settings import ModelSettings, TrainSettings
from triage.model.training import fit
from triage.training.augment import make_augment
from triage.training.settings import RetrainSettings

TOLERANCE = 1e-5
NOISE = 1e-6  # gradients at most this large are rounding noise for AdamW's first step
SIZE = 28
MODEL = ModelSettings(
    input_size=SIZE, channels=(8, 16), subunits=2, lossnet_width=16, dropout=0.0,
    block_dropout=0.0,
    training=TrainSettings(epochs=1, min_steps=0, batch_size=32, learning_rate=3e-3, seed=0),
)
# one step: a single global batch; several: 2 epochs of 3 batches, the last detached
SCENARIOS = {
    "one_step": {"images": 32, "training": {}},
    "steps": {"images": 48, "training": {"epochs": 2, "batch_size": 16,
                                         "detach_after_fraction": 0.5}},
}


def _train(scenario: str, shard: Shard | None) -> dict[str, object]:
    spec = SCENARIOS[scenario]
    settings = MODEL.training.model_copy(update=spec["training"])
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(spec["images"], 1, SIZE, SIZE, generator=generator)
    labels = (torch.rand(spec["images"], generator=generator) < 0.3).long()
    torch.manual_seed(0)
    net, loss_predictor = build_network(MODEL), build_loss_predictor(MODEL)
    history = fit(net, loss_predictor, images, labels, settings,
                  augment=make_augment(RetrainSettings(), SIZE), shard=shard)
    modules = {"net": net, "loss_predictor": loss_predictor}
    return {
        "state": {f"{name}.{key}": value.detach().clone() for name, module in modules.items()
                  for key, value in module.state_dict().items()},
        # the last step's gradient (DDP's average over the processes)
        "grad": {f"{name}.{key}": p.grad.clone() for name, module in modules.items()
                 for key, p in module.named_parameters()},
        "losses": [e[key] for e in history.epochs for key in ("loss", "ce", "rank")],
        "forgetting": history.forgetting, "learned": history.learned,
    }


def _rank(rank: int, world: int, init: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for scenario in SCENARIOS:
            result = _train(scenario, Shard(rank, world))
            if rank == 0:
                torch.save(result, Path(folder) / f"{scenario}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict[str, dict[str, object]]:
    folder = tmp_path_factory.mktemp("ddp")
    context = mp.start_processes(_rank, args=(2, f"file://{folder}/rendezvous", str(folder)),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.kill()
            pytest.fail("the two training processes did not finish in 120 s")
    return {scenario: torch.load(folder / f"{scenario}.pt") for scenario in SCENARIOS}


def _bn_cancelled_biases(state: dict[str, torch.Tensor]) -> set[str]:
    """Biases of MONAI convolutions followed by a batch normalisation (`...conv.bias`
    beside `...adn.N.running_mean`)."""
    return {key for key in state if key.endswith(".conv.bias")
            and key.removesuffix("conv.bias") + "adn.N.running_mean" in state}


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: set[str]
           ) -> tuple[float, str]:  # fmt: skip
    assert a.keys() == b.keys()
    return max((float((a[k].double() - b[k].double()).abs().max()), k)
               for k in a if k not in skip and a[k].is_floating_point())


def test_one_step_on_two_processes_is_the_one_process_step(two_processes):
    one, two = _train("one_step", None), two_processes["one_step"]
    assert _worst(one["grad"], two["grad"], set())[0] < TOLERANCE
    weights = set(one["grad"])
    assert _worst(one["state"], two["state"], weights)[0] < TOLERANCE  # buffers
    for name, grad in one["grad"].items():
        above_noise = grad.abs() > NOISE
        difference = (one["state"][name] - two["state"][name]).abs()[above_noise]
        assert difference.numel() == 0 or float(difference.max()) < TOLERANCE, name
    noise = sum(int((grad.abs() <= NOISE).sum()) for grad in one["grad"].values())
    assert noise < 0.05 * sum(grad.numel() for grad in one["grad"].values())  # measured 4%
    assert one["losses"] == pytest.approx(two["losses"], abs=TOLERANCE)
    assert torch.equal(one["forgetting"], two["forgetting"])
    assert torch.equal(one["learned"], two["learned"])


def test_several_steps_follow_the_one_process_run(two_processes):
    one, two = _train("steps", None), two_processes["steps"]
    state = one["state"]
    moved = _bn_cancelled_biases(state) | {k for k in state if k.endswith("running_mean")}
    assert _worst(one["state"], two["state"], moved)[0] < TOLERANCE
    assert one["losses"] == pytest.approx(two["losses"], abs=TOLERANCE)
    assert torch.equal(one["forgetting"], two["forgetting"])


def test_ranking_pairs_of_a_sharded_batch():
    assert Shard(0, 2).pairs(16) == 8  # 2 slices of 8: the one-process pairs
    assert Shard(1, 2).pairs(10) == 4  # 5 + 5: one pair fewer than one process's 5
    assert Shard(0, 3).pairs(12) == 6
    assert Shard(1, 2).mine(torch.arange(6)).tolist() == [1, 3, 5]
