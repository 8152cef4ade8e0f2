"""Multi-process training on PyTorch's own engine: ``torchrun`` + DistributedDataParallel.

biogen never asks for a ``--distributed`` flag: a process started by ``torchrun`` (or any launcher
that sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` plus ``MASTER_ADDR`` / ``MASTER_PORT``) is
distributed, any other process is not. Every helper here is a no-op in a single process, so a trainer
written against this module runs unchanged with ``python ...`` and with ``torchrun --nproc_per_node N``.

Conventions used by the trainers:

- :func:`init` creates the process group once (NCCL when CUDA is available, Gloo otherwise) and
  pins each process to GPU ``LOCAL_RANK``;
- the *global* batch is the configured batch size; each rank trains on its own contiguous slice of
  it, and DDP averages the gradients, so one step on N ranks equals one step of one process on the
  same global batch (:func:`split_batch`);
- metrics are averaged across ranks with :func:`all_reduce_mean`; only the main process (rank 0)
  writes checkpoints, plots and reports (:func:`is_main`, :func:`main_only`), the others wait at
  :func:`barrier` where needed;
- checkpoints hold the unwrapped module's state (:func:`unwrap`), so a run saved with N processes
  resumes with any other number.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional, TypeVar

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["launched_by_torchrun", "env_rank", "init", "is_initialized", "rank", "local_rank", "world_size",
           "is_main", "device", "barrier", "wrap_ddp", "wrap_loss", "unwrap", "all_reduce_mean", "all_reduce_sum",
           "broadcast_object", "broadcast_buffers", "split_batch", "rank_share", "rank_batches", "shard_indices", "main_only", "destroy"]

T = TypeVar("T")


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from exc


def launched_by_torchrun() -> bool:
    """True when the launcher environment (``RANK`` and ``WORLD_SIZE``) says there are >= 2 processes."""
    ws = _env_int("WORLD_SIZE")
    return _env_int("RANK") is not None and ws is not None and ws > 1


def env_rank() -> int:
    """This process's rank from the environment (0 when not launched by torchrun).

    Usable before :func:`init`, e.g. to silence the console of non-main ranks at start-up.
    """
    return (_env_int("RANK") or 0) if launched_by_torchrun() else 0


def init(backend: Optional[str] = None, *, timeout_s: float = 1800.0) -> bool:
    """Create the default process group if launched by torchrun; idempotent.

    Parameters
    ----------
    backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else Gloo.
    timeout_s: collective timeout (rank 0 evaluating while the others wait must fit in it).

    Returns
    -------
    True when running distributed (group created now or before), False in a single process.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise RuntimeError("launched by torchrun but this PyTorch build has no torch.distributed")
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        if name not in os.environ:
            raise RuntimeError(f"launched with RANK/WORLD_SIZE but {name} is not set: start with torchrun")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl":
        n_gpu = torch.cuda.device_count()
        lr = _env_int("LOCAL_RANK") or 0
        if lr >= n_gpu:
            raise RuntimeError(f"LOCAL_RANK {lr} but only {n_gpu} GPU(s) visible: use --nproc_per_node <= {n_gpu}")
        # Pin before creating the group, so NCCL's communicator is built on this process's GPU.
        torch.cuda.set_device(lr)
    import datetime

    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 in a single process)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 in a single process)."""
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """Rank on this machine (``LOCAL_RANK``; 0 in a single process)."""
    return (_env_int("LOCAL_RANK") or 0) if is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that writes files and prints."""
    return rank() == 0


def device() -> torch.device:
    """The device this process should train on: its own GPU under NCCL, else GPU 0 / CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    if not is_initialized() and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[local_rank()])
        else:
            dist.barrier()


def wrap_ddp(module: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """``DistributedDataParallel(module)`` when distributed, ``module`` itself otherwise.

    The module must already be on :func:`device`. Parameters are broadcast from rank 0 on wrapping,
    so every rank starts from the same weights. ``kwargs`` go to DDP (e.g. ``find_unused_parameters``).
    """
    if not is_initialized() or world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    p = next(module.parameters(), None)
    if p is not None and p.is_cuda:
        kwargs.setdefault("device_ids", [p.device.index])
    return DDP(module, **kwargs)


class _LossCall(torch.nn.Module):
    """A module whose forward is ``fn(inner, *args, **kwargs)``: DDP hooks ``forward`` only."""

    def __init__(self, inner: torch.nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.inner = inner
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(self.inner, *args, **kwargs)


def wrap_loss(module: torch.nn.Module, fn: Callable[..., Any], **kwargs) -> Callable[..., Any]:
    """A callable computing ``fn(module, *args, **kwargs)`` with gradients synchronised across ranks.

    Models often train through a method (``module.loss(batch)``) rather than ``forward``; DDP only
    synchronises what runs inside the wrapped module's ``forward``, so this puts ``fn`` there. In a
    single process it is ``functools.partial(fn, module)``. ``kwargs`` go to DDP; parameters that a
    step may leave unused (heads of other objectives) need ``find_unused_parameters=True``.
    """
    if not is_initialized() or world_size() == 1:
        return functools.partial(fn, module)
    return wrap_ddp(_LossCall(module, fn), **kwargs)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (state dicts saved from it carry no ``module.`` prefix)."""
    return module.module if hasattr(module, "module") and hasattr(module, "require_backward_grad_sync") else module


def _all_reduce(x, mean: bool):
    if not is_initialized() or world_size() == 1:
        return x
    if isinstance(x, torch.Tensor):
        t = x.detach().clone()
        back = None
        if dist.get_backend() == "nccl" and not t.is_cuda:
            back, t = t.device, t.to(device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if mean:
            t /= world_size()
        return t if back is None else t.to(back)
    out = _all_reduce(torch.from_numpy(np.array(x, dtype=np.float64)), mean).numpy()
    return out if isinstance(x, np.ndarray) else float(out)


def all_reduce_mean(x):
    """Mean over ranks of a tensor, a float or a numpy array (the value itself in one process).

    Returns the same kind as given; tensors are reduced out of place on their own device (under NCCL
    a CPU tensor is moved to the GPU for the collective and back).
    """
    return _all_reduce(x, mean=True)


def all_reduce_sum(x):
    """Sum over ranks, like :func:`all_reduce_mean`: for sums and counts divided only after the
    reduction (exact global means over shards of unequal size)."""
    return _all_reduce(x, mean=False)


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` from rank ``src`` on every rank (picklable objects; identity in one process)."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=device() if dist.get_backend() == "nccl" else None)
    return box[0]


def split_batch(global_batch: int, *, rank_: Optional[int] = None, world: Optional[int] = None) -> slice:
    """This rank's slice of a global batch of ``global_batch`` items.

    Raises a ValueError when the batch does not split evenly: unequal shards would make DDP's gradient
    average differ from the single-process mean over the global batch.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if global_batch % w:
        raise ValueError(f"the global batch size ({global_batch}) must be divisible by the world size ({w}): "
                         f"each rank trains on batch_size / world_size items")
    per = global_batch // w
    return slice(r * per, (r + 1) * per)


def rank_batches(order, batch_size: int, *, min_per_rank: int = 1):
    """Yield ``(indices, loss_scale)``: this rank's share of each global batch of ``order``.

    Every rank must pass the same ``order`` (draw it from a generator seeded identically on all
    ranks). Consecutive global batches of ``batch_size`` items are split as evenly as possible across
    ranks, so N processes see exactly the batches one process would. ``loss_scale`` =
    ``n_local * world / n_global`` makes DDP's average of per-rank mean losses equal the mean over the
    global batch even when the last batch splits unevenly (1.0 in one process). A final global batch
    too small to give every rank ``min_per_rank`` items is dropped on every rank (ranks must stay in
    lockstep; BatchNorm needs 2 items per rank).
    """
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = np.asarray(order)
    for s in range(0, len(order), batch_size):
        b = order[s:s + batch_size]
        if len(b) < world_size() * min_per_rank:
            break
        part, scale = rank_share(len(b), min_per_rank=min_per_rank)
        yield b[part], scale


def rank_share(n_global: int, *, min_per_rank: int = 1) -> tuple[slice, float]:
    """This rank's contiguous part of one global batch of ``n_global`` items, and its loss scale.

    The split :func:`rank_batches` uses (``np.array_split`` order), for trainers that draw their
    global batch themselves (random indices per step) or draw per-sample noise for the whole global
    batch and keep their part of it. ``loss_scale`` = ``n_local * world / n_global`` (1.0 in one
    process). Raises a ValueError when the batch cannot give every rank ``min_per_rank`` items.
    """
    w, r = world_size(), rank()
    if n_global < w * min_per_rank:
        raise ValueError(f"the global batch ({n_global} items) is smaller than {min_per_rank} per process times the "
                         f"world size ({w}): use a larger batch size or fewer processes")
    per, extra = divmod(n_global, w)
    start = r * per + min(r, extra)
    n_local = per + (1 if r < extra else 0)
    return slice(start, start + n_local), n_local * w / n_global


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``src``'s buffers (BatchNorm running statistics...) into every rank's module, in place.

    DDP broadcasts buffers only at the start of a training forward, so after the last step of an
    epoch each rank holds statistics updated by its own batch; call this before evaluating.
    """
    if not is_initialized() or world_size() == 1:
        return
    for b in module.buffers():
        if dist.get_backend() == "nccl" and not b.is_cuda:
            t = b.to(device())
            dist.broadcast(t, src)
            b.copy_(t)
        else:
            dist.broadcast(b, src)


def shard_indices(n: int, *, epoch: int = 0, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                  rank_: Optional[int] = None, world: Optional[int] = None) -> np.ndarray:
    """A deterministic distributed sampler: this rank's indices of ``range(n)`` for an epoch.

    Every rank draws the same permutation from ``(seed, epoch)`` and takes every ``world``-th item from
    its rank on. ``drop_last=False`` pads by wrapping around so every rank gets ``ceil(n / world)``
    indices (a few items are seen twice); ``drop_last=True`` drops the tail so each gets
    ``n // world`` (each item at most once). The union over ranks of the first ``n // world`` indices
    is always duplicate-free.

    Returns
    -------
    (n_per_rank,) int64 indices.
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is outside 0..{w - 1}")
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if drop_last:
        order = order[: (n // w) * w]
    else:
        per = -(-n // w)
        order = np.resize(order, per * w)  # np.resize repeats from the start
    return order[r::w].astype(np.int64)


def main_only(fn: Callable[..., T]) -> Callable[..., Optional[T]]:
    """Decorator: run ``fn`` on the main process only (others get None). Use it for writers."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if is_main():
            return fn(*args, **kwargs)
        return None

    return wrapper


def destroy() -> None:
    """Tear the process group down (no-op when there is none)."""
    if is_initialized():
        dist.destroy_process_group()


def describe() -> dict[str, Any]:
    """Rank, world size, backend and device of this process (for logs and reports)."""
    return {"rank": rank(), "world_size": world_size(), "local_rank": local_rank(),
            "backend": dist.get_backend() if is_initialized() else None, "device": str(device())}
