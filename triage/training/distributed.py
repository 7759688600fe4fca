"""Retraining in several processes (`retrain.nproc` > 1), under torch's own launcher.

The scheduler starts ``python -m torch.distributed.run --standalone --nnodes 1
--nproc-per-node N -m triage.training.worker ...`` (`launch_command`): a local
rendezvous on a free port, N worker processes, no restarts. The launcher forwards SIGTERM
to its workers and kills what is left after its shutdown timeout; each worker also
asks the kernel for SIGTERM should the launcher die first (`die_with_launcher`).

Inside each worker (`join`): one process group, gloo for a CPU model and NCCL for a
CUDA one. Rank 0 leads: it loads the labels, evaluates, calibrates, registers, writes
the store and ends the run row, exactly as one process does. Before each training (the
candidate, and the refit after a promotion) it broadcasts what `train_candidate` needs
(`triage.training.train.TrainJob`: the initial modules, the training images, the
sampling weights); the other ranks train their share of every batch
(`triage.model.parallel`) and wait for the next job, until rank 0 says there is none
(`release`). They never open the store: all ranks train on rank 0's snapshot of the
labels, even while new labels arrive. A rank that fails takes the group down (the
launcher stops the others); rank 0 records why.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any

import torch
import torch.distributed as dist

from triage.model.parallel import Shard

LAUNCHER_MODULE = "torch.distributed.run"
_PR_SET_PDEATHSIG = 1


def launch_command(nproc: int, module: str, arguments: list[str]) -> list[str]:
    """The command line starting `module` in `nproc` processes under torchrun."""
    return [sys.executable, "-m", LAUNCHER_MODULE, "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(nproc), "--max-restarts", "0", "-m", module, *arguments]


def launched_world() -> int:
    """Processes of this run according to torchrun's environment (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def backend_for(device: torch.device) -> str:
    """NCCL for a CUDA device (when this torch has it), gloo otherwise."""
    if device.type == "cuda" and torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def join(device: torch.device | None = None) -> Shard | None:
    """Join the process group torchrun set up; None when this is a one-process run.

    Args:
        device: Where the modules train: the CPU (the default, gloo), or CUDA (this
            rank's ``LOCAL_RANK`` device, NCCL).
    """
    world = launched_world()
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    device = torch.device("cpu") if device is None else device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), rank=rank, world_size=world)
    return Shard(rank, world, device)


def leave(shard: Shard | None) -> None:
    """Destroy the process group (a no-op in a one-process run)."""
    if shard is not None and dist.is_initialized():
        dist.destroy_process_group()


def send(shard: Shard, job: Any) -> None:
    """Rank 0: broadcast `job` (None: no more jobs) to the other ranks."""
    objects = [job]
    dist.broadcast_object_list(objects, src=0, group=shard.group, device=_comm_device(shard))


def receive(shard: Shard) -> Any:
    """Other ranks: wait for rank 0's next job (None: no more)."""
    objects: list[Any] = [None]
    dist.broadcast_object_list(objects, src=0, group=shard.group, device=_comm_device(shard))
    return objects[0]


def release(shard: Shard | None) -> None:
    """Rank 0: tell the other ranks no training follows, so they exit while rank 0
    registers and decides."""
    if shard is not None and shard.leader:
        send(shard, None)


def _comm_device(shard: Shard) -> torch.device | None:
    return shard.device if shard.device.type == "cuda" else None


def die_with_launcher() -> None:
    """Ask Linux to send this process SIGTERM when its parent, the launcher, dies (a
    launcher killed by SIGKILL cannot forward a signal); exit at once when it is gone
    already. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
