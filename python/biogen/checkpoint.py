"""Resumable training state for the epoch-based trainers (RNA VAE, PumaMedNet).

A checkpoint folder holds ``weights.safetensors`` (every module's state, keys prefixed by the module's
name), ``optim.pt`` (optimizer / scheduler states), ``rng.pt`` (torch generator states) and, written
last, ``trainer_state.json`` (epoch, history, the configuration it was trained with): a folder whose
``trainer_state.json`` exists holds a complete checkpoint. Each file is replaced atomically, so a
crash leaves the previous checkpoint readable. Under torchrun only rank 0 writes (then every rank
waits), and every rank reads; the states hold no per-rank data, so a checkpoint resumes with any
number of processes.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from . import distributed as bdist
from .utils import atomic_path, write_json

__all__ = ["save_training_state", "load_training_state"]

_STATE = "trainer_state.json"


def _flat(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().cpu().contiguous() for name, m in modules.items()
            for k, v in (m.state_dict() if isinstance(m, torch.nn.Module) else m).items()}


def save_training_state(folder, *, modules: dict[str, Any], optimizers: dict[str, Any],
                        generators: dict[str, torch.Generator], state: dict) -> None:
    """Write a checkpoint (rank 0 only; every rank returns once it is complete).

    modules: name -> module or state dict (e.g. the best weights so far); optimizers: name ->
    object with ``state_dict()`` (optimizers, LR schedulers); state: JSON-serialisable trainer state.
    """
    from safetensors.torch import save_file

    if bdist.is_main():
        os.makedirs(folder, exist_ok=True)
        tensors = _flat(modules)
        with atomic_path(os.path.join(folder, "weights.safetensors")) as tmp:
            save_file(tensors, str(tmp))
        with atomic_path(os.path.join(folder, "optim.pt")) as tmp:
            torch.save({k: o.state_dict() for k, o in optimizers.items()}, tmp)
        with atomic_path(os.path.join(folder, "rng.pt")) as tmp:
            torch.save({k: g.get_state() for k, g in generators.items()}, tmp)
        write_json(os.path.join(folder, _STATE), state)
    bdist.barrier()


def load_training_state(folder, *, modules: dict[str, Any], optimizers: dict[str, Any],
                        generators: dict[str, torch.Generator], config: Optional[dict] = None) -> dict:
    """Restore what :func:`save_training_state` wrote into the given objects; return the trainer state.

    ``modules`` may name state dicts to fill (their tensors are replaced); a name missing from the
    checkpoint is left as it is. ``config``: the configuration of this run; a checkpoint trained with
    another one is refused with an error naming the differences.
    """
    from safetensors.torch import load_file

    path = os.path.join(folder, _STATE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume asked for, but {folder} holds no checkpoint ({_STATE} is missing)")
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    if config is not None:
        saved = state.get("config", {})
        mine = json.loads(json.dumps(config, default=str))
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if diff:
            shown = ", ".join(f"{k}: {saved.get(k)!r} vs {mine.get(k)!r}" for k in diff[:6])
            raise ValueError(f"the checkpoint in {folder} was trained with another configuration (checkpoint vs "
                             f"now: {shown}); resume with the same settings or start a new run")
    tensors = load_file(os.path.join(folder, "weights.safetensors"))
    for name, m in modules.items():
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        if not own:
            continue
        if isinstance(m, torch.nn.Module):
            m.load_state_dict(own)
        else:
            m.clear()
            m.update(own)
    opt = torch.load(os.path.join(folder, "optim.pt"), map_location="cpu", weights_only=True)
    for k, o in optimizers.items():
        o.load_state_dict(opt[k])
    rng = torch.load(os.path.join(folder, "rng.pt"), weights_only=True)
    for k, g in generators.items():
        g.set_state(rng[k])
    return state
