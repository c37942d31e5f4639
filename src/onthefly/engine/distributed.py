"""Data parallelism with torch.distributed: process-group setup from torchrun (or Slurm tasks via submitit),
sharded evaluation, seeded RNG streams, and the collectives the trainer needs (the samplers live in
`onthefly.data.loaders`).

One process per device. ``trainer.batch_size`` is the GLOBAL batch: each of the N ranks takes batch_size / N
samples, so a run keeps its protocol (lr, batch) whatever N is. Every rank computes the same ρ, k and q: the
scores s_m are summed over ranks before ρ (docs/method.md §2), and OGM edits gradients after DDP's all-reduce.
Rank 0 alone writes logs, W&B and checkpoints. In a single process every helper here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from onthefly.data.loaders import mix_seed
from onthefly.engine.errors import TrainingError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _export_submitit_env() -> None:
    """Inside a Slurm/local submitit job with several tasks, export RANK, WORLD_SIZE, MASTER_ADDR, ... the way
    torchrun would (submitit's own helper), so the same env:// initialisation serves both launchers."""
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def setup(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group described by the environment (torchrun's RANK / WORLD_SIZE / LOCAL_RANK /
    MASTER_ADDR / MASTER_PORT) and pick this rank's device. Without those variables: one process, no group."""
    _export_submitit_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), select_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = device_name == "auto" or device_name.startswith("cuda")
    if wants_cuda and torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device_name.startswith("cuda"):
        raise TrainingError(f"trainer.device={device_name} but this rank sees no CUDA device")
    else:
        device, backend = torch.device("cpu"), "gloo"
    here = not dist.is_initialized()
    if here:
        dist.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, initialized_here=here), device


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def teardown(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


# --- collectives (identity in one process) ----------------------------------------------------------------
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor). Passed to `discrepancy` so that ρ uses the global scores."""
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def mean_over_ranks(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return t
    return all_reduce_sum(t) / info.world_size


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, in place. The weights are identical on
    every rank already (DDP averages the gradients); the running statistics are not where each rank normalises
    its own samples (CPU runs, or sync_batchnorm=false), so evaluation would score each shard with another model
    than the one rank 0 saves."""
    if not info.enabled:
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


@contextlib.contextmanager
def seeded_rng(device: torch.device, *parts: int):
    """Run a block on RNG streams seeded from ``parts`` (CPU, and the CUDA device if used), then restore the
    previous states. The loop uses it under DDP: each rank's OPM drop masks come from a stream of its own, while
    the GE noise comes from one shared by every rank, so the replicas' weights stay identical."""
    seed = mix_seed(*parts)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


# --- evaluation: shard, gather, drop the padding --------------------------------------------------------------
@torch.no_grad()
def gathered_features(model, loader, device, limit: Optional[int], info: DistInfo):
    """Encoder features of a split evaluated in shards (one per rank, DistributedSampler without shuffling),
    gathered on every rank. The duplicates that pad the shards are dropped by sample index and the rows put in
    index order, so the metrics equal a single-process evaluation. Returns ({modality: [N, D]}, labels [N])."""
    from onthefly.engine.evaluation import collect, to_device

    model.eval()
    feats: dict[str, list] = {}
    labels, indices = [], []
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        if "index" not in batch:
            raise TrainingError("sharded evaluation needs each item's 'index' (see onthefly.data.base.DataSplits)")
        inputs, y = to_device(batch, model.input_keys, device)
        collect(feats, model.encode(inputs))
        labels.append(y)
        indices.append(torch.as_tensor(batch["index"]).to(device))
    local = {m: torch.cat(v) for m, v in feats.items()}
    local_labels, local_index = torch.cat(labels), torch.cat(indices)

    def gather(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(info.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    index = gather(local_index)
    order = torch.argsort(index, stable=True)
    first = torch.ones_like(order, dtype=torch.bool)
    first[1:] = index[order][1:] != index[order][:-1]
    keep = order[first]
    return {m: gather(f)[keep] for m, f in local.items()}, gather(local_labels)[keep]
