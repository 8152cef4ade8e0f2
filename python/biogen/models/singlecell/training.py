"""The training loop shared by the single-cell models (:class:`~biogen.models.scgpt.ScGPT`,
:class:`~biogen.models.scbert.ScBERT`): validation split, class weights, epochs with progress bar,
validation loss / accuracy, early stopping, atomic resumable checkpoints, and DistributedDataParallel.

Under ``torchrun`` (see :mod:`biogen.distributed`) the same call trains on every rank: every rank
draws the same shuffled order of the training cells, each takes its share of every global batch of
``batch_size`` cells (so N processes see the batches one process would, and their averaged gradients
equal the global-batch gradient), validation is sharded and its sums reduced across ranks, only rank 0
writes checkpoints and draws the progress bar, and a checkpoint resumes with any number of processes.

A model plugs in with three callables:

- ``get_batch(rows, gen) -> dict`` the batch of training / validation cells ``rows`` on the device
  (``"labels"`` included for classification);
- ``loss_fn(module, batch, weights, gen) -> Tensor`` the mean loss over the batch;
- ``n_correct(module, batch) -> (correct, labelled)`` for classification accuracy.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from ... import distributed as bdist
from ...utils import atomic_path, write_json

__all__ = ["validation_split", "autocast", "check_train_args", "fit_loop", "save_weights", "load_weights", "atomic_write"]


def validation_split(n: int, labels: Optional[np.ndarray], fraction: float, seed: int):
    """Sorted (train, validation) indices of ``range(n)``; stratified by ``labels`` when every class
    has two cells and there are at least as many validation cells as classes."""
    idx = np.arange(n)
    if fraction == 0:
        return idx, np.array([], dtype=np.int64)
    n_val = int(round(fraction * n))
    if n_val < 1 or n - n_val < 1:
        raise ValueError(f"validation_fraction={fraction} leaves {n - n_val} training / {n_val} validation "
                         f"cells of {n}; use 0 to disable validation")
    from sklearn.model_selection import train_test_split

    strat = None
    if labels is not None:
        _, counts = np.unique(labels, return_counts=True)
        if counts.min() >= 2 and n_val >= len(counts):
            strat = labels
    tr, va = train_test_split(idx, test_size=n_val, random_state=seed, stratify=strat)
    return np.sort(tr), np.sort(va)


def autocast(device: torch.device, enabled: bool):
    """Mixed precision: float16 on CUDA, bfloat16 on the CPU; a null context when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def check_train_args(epochs, batch_size, lr, validation_fraction, early_stopping_patience, checkpoint_dir, resume):
    """Clear errors for bad training arguments, before any data is tokenised."""
    for name, v, lo in (("epochs", epochs, 1), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    if early_stopping_patience is not None and (early_stopping_patience < 1 or validation_fraction == 0):
        raise ValueError("early_stopping_patience needs validation_fraction > 0 and a value >= 1")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    if bdist.world_size() > batch_size:
        raise ValueError(f"batch_size ({batch_size}) is the global batch: it must be at least the number of "
                         f"processes ({bdist.world_size()})")


def atomic_write(path: str, write) -> None:
    """Write through ``write(tmp_path)`` to a temporary file beside ``path``, then rename it into place."""
    with atomic_path(path) as tmp:
        write(str(tmp))


def save_weights(path: str, module: torch.nn.Module) -> None:
    """The module's state dict as safetensors, atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))


def load_weights(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def save_checkpoint(owner, folder: str, opt, state: dict) -> None:
    """Weights, optimizer, the model's metadata, then the trainer state (its presence marks a complete
    checkpoint); each file atomically."""
    save_weights(os.path.join(folder, "model.safetensors"), owner.module)
    atomic_write(os.path.join(folder, "optimizer.pt"), lambda tmp: torch.save(opt.state_dict(), tmp))
    owner._write_meta(folder)
    write_json(os.path.join(folder, "trainer_state.json"), state)


def load_checkpoint(owner, folder: str, opt, objective: str) -> dict:
    """Restore weights and optimizer from ``folder``; refuses a checkpoint of another objective or model
    configuration with an error naming the difference."""
    path = os.path.join(folder, "trainer_state.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume=True but {folder} holds no trainer_state.json")
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    if state.get("objective") != objective:
        raise ValueError(f"checkpoint in {folder} is from objective {state.get('objective')!r}, not {objective!r}")
    meta_path = os.path.join(folder, "config.json")
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            saved = json.load(f)
        mine = json.loads(json.dumps(owner._meta()))  # the same JSON round trip as the saved file
        diff = sorted(k for k in set(saved.get("config", {})) | set(mine["config"])
                      if saved.get("config", {}).get(k) != mine["config"].get(k))
        diff += [k for k in ("n_classes", "label_categories") if saved.get(k) != mine.get(k)]
        if diff:
            shown = ", ".join(f"{k}: {saved.get('config', saved).get(k)!r} vs {mine.get('config', mine).get(k)!r}"
                              if k in mine["config"] else f"{k}: {saved.get(k)!r} vs {mine.get(k)!r}" for k in diff[:6])
            raise ValueError(f"checkpoint in {folder} was trained with another model configuration "
                             f"(checkpoint vs this model: {shown}); resume it with the same preset and data, "
                             "or choose another checkpoint_dir")
    owner.module.load_state_dict(load_weights(os.path.join(folder, "model.safetensors")))
    opt.load_state_dict(torch.load(os.path.join(folder, "optimizer.pt"), map_location=owner.device, weights_only=True))
    return state


def class_weight_tensor(labels: np.ndarray, n_classes: int, device) -> torch.Tensor:
    """Inverse class frequency weights (n / (k * count)); 0 for classes absent from ``labels``."""
    lab = labels[labels >= 0]
    counts = np.bincount(lab, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (len(counts) * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32, device=device)


def fit_loop(owner, objective: str, *, n_cells: Optional[int], labels: Optional[np.ndarray], params,
             get_batch: Callable, loss_fn: Callable, n_correct: Optional[Callable], epochs: int, batch_size: int,
             lr: float, validation_fraction: float, early_stopping_patience: Optional[int], class_weights: bool,
             checkpoint_dir: Optional[str], resume: bool, progress: bool, mixed_precision: bool, seed: int,
             desc: str, on_epoch: Optional[Callable[[int], None]] = None,
             stream: Optional[Callable[[], Iterator[tuple[dict, int]]]] = None, stream_steps: int = 0) -> list[dict]:
    """Train ``owner.module`` (see the module docstring); returns and sets ``owner.history``.

    ``owner`` provides ``module``, ``device``, ``_meta()`` and ``_write_meta(folder)``. The shuffling,
    masks and dropout of an epoch depend only on (seed, epoch, rank), so a resumed run repeats the
    uninterrupted one. torch's global RNG state is restored afterwards. ``on_epoch(epoch)`` runs
    before each epoch (e.g. a dataset's ``set_epoch``).

    Out of core: ``stream()`` yields this rank's ``(batch, n_cells)`` for one epoch (``stream_steps``
    of them, the same count on every rank), instead of ``n_cells`` indexed through ``get_batch``;
    there is no validation split then.
    """
    from tqdm.auto import tqdm

    check_train_args(epochs, batch_size, lr, validation_fraction, early_stopping_patience, checkpoint_dir, resume)
    if bdist.init() and owner.device.type == "cuda":
        owner.device = bdist.device()  # one GPU per process
        owner.module.to(owner.device)
    rank, world, main = bdist.rank(), bdist.world_size(), bdist.is_main()
    module = owner.module
    if stream is None:
        tr_idx, va_idx = validation_split(n_cells, labels, validation_fraction, seed)
        steps_per_epoch = len(range(0, len(tr_idx), batch_size)) - int(0 < len(tr_idx) % batch_size < world)
    else:
        tr_idx, va_idx, steps_per_epoch = None, np.array([], dtype=np.int64), stream_steps
    weights = None
    if objective == "classify" and class_weights:
        weights = class_weight_tensor(labels[tr_idx], len(owner.label_categories), owner.device)
    params = list(params)
    opt = torch.optim.Adam(params, lr=lr)
    scaler = torch.amp.GradScaler("cuda") if (mixed_precision and owner.device.type == "cuda") else None
    state = {"objective": objective, "epoch": 0, "step": 0, "best_val": None, "bad_epochs": 0, "history": []}
    best_weights = None
    if checkpoint_dir is not None:
        if resume:
            state = load_checkpoint(owner, checkpoint_dir, opt, objective)
            best_path = os.path.join(checkpoint_dir, "best.safetensors")
            if early_stopping_patience is not None and os.path.exists(best_path):
                best_weights = load_weights(best_path)
        elif os.path.exists(os.path.join(checkpoint_dir, "trainer_state.json")):
            raise FileExistsError(f"{checkpoint_dir} already holds a training checkpoint; pass resume=True "
                                  "to continue it or choose another checkpoint_dir")
        bdist.barrier()  # every rank has read the folder before rank 0 writes into it
        if main:
            os.makedirs(checkpoint_dir, exist_ok=True)

    step_loss = bdist.wrap_loss(module, loss_fn, find_unused_parameters=True)
    bar = tqdm(total=max(0, epochs - state["epoch"]) * steps_per_epoch, disable=not (progress and main),
               desc=desc, unit="batch")
    cuda_devs = [owner.device.index or 0] if owner.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devs):
        for epoch in range(state["epoch"], epochs):
            if early_stopping_patience is not None and state["bad_epochs"] >= early_stopping_patience:
                break
            epoch_seed = seed * 100_003 + epoch
            # dropout and Performer projection redraws; the same stream on every rank, because a redrawn
            # projection is a buffer every rank must agree on (dropout masks still differ: other cells)
            torch.manual_seed(epoch_seed)
            gen = torch.Generator().manual_seed(epoch_seed + 1)
            if stream is None:
                order = tr_idx[torch.randperm(len(tr_idx), generator=gen).numpy()]  # the same on every rank
                batches = ((get_batch(rows, gen), len(rows), scale) for rows, scale in bdist.rank_batches(order, batch_size))
            if world > 1:
                gen.manual_seed(epoch_seed + 1 + 7919 * (rank + 1))  # masks: each rank its own draws
            if on_epoch is not None:
                on_epoch(epoch)
            if stream is not None:
                batches = ((batch, n, 1.0) for batch, n in stream())
            module.train()
            total, count = 0.0, 0
            for batch, n, scale in batches:
                with autocast(owner.device, mixed_precision):
                    loss = step_loss(batch, weights, gen)
                opt.zero_grad(set_to_none=True)
                scaled = loss * scale if scale != 1.0 else loss
                if scaler is not None:
                    scaler.scale(scaled).backward()
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    scaler.step(opt)
                    scaler.update()
                else:
                    scaled.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                total += float(loss.detach()) * n
                count += n
                state["step"] += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.4f}")
            total, count = bdist.all_reduce_sum(np.array([total, count], dtype=np.float64))
            rec = {"epoch": epoch + 1, "step": state["step"], "train_loss": float(total / max(count, 1))}
            if len(va_idx):
                rec.update(_evaluate(owner, va_idx[rank::world], get_batch, loss_fn, n_correct, objective,
                                     batch_size, weights, mixed_precision, seed))
                if state["best_val"] is None or rec["val_loss"] < state["best_val"]:
                    state["best_val"], state["bad_epochs"] = rec["val_loss"], 0
                    if early_stopping_patience is not None:
                        best_weights = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
                        if checkpoint_dir is not None and main:
                            save_weights(os.path.join(checkpoint_dir, "best.safetensors"), module)
                else:
                    state["bad_epochs"] += 1
            state["epoch"] = epoch + 1
            state["history"].append(rec)
            if checkpoint_dir is not None:
                if main:
                    save_checkpoint(owner, checkpoint_dir, opt, {**state, "world_size": world})
                bdist.barrier()  # the checkpoint is complete before any rank goes on (or returns)
    bar.close()
    if best_weights is not None:
        module.load_state_dict(best_weights)
    module.eval()
    owner.history = list(state["history"])
    return owner.history


@torch.no_grad()
def _evaluate(owner, idx, get_batch, loss_fn, n_correct, objective, batch_size, weights, mixed_precision,
              seed) -> dict:
    """Validation loss (and accuracy) over this rank's cells ``idx``, summed over ranks."""
    owner.module.eval()
    gen = torch.Generator().manual_seed(seed + 7919 * bdist.rank())  # the same validation masks every epoch
    sums = np.zeros(4)  # loss * cells, cells, correct, labelled
    for s in range(0, len(idx), batch_size):
        rows = idx[s:s + batch_size]
        batch = get_batch(rows, gen)
        with autocast(owner.device, mixed_precision):
            sums[0] += float(loss_fn(owner.module, batch, weights, gen)) * len(rows)
            if objective == "classify":
                sums[2:] += n_correct(owner.module, batch)
        sums[1] += len(rows)
    total, count, correct, n_lab = bdist.all_reduce_sum(sums)
    out = {"val_loss": float(total / max(count, 1))}
    if objective == "classify":
        out["val_accuracy"] = float(correct / max(n_lab, 1))
    return out
