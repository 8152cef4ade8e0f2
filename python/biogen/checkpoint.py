"""Resumable training state for the epoch-based trainers (RNA VAE, PumaMedNet).

A checkpoint folder holds ``weights.safetensors`` (every module's state, keys prefixed by the module's
name), ``optim.pt`` (optimizer / scheduler states), ``rng.pt`` (torch generator states),
``trainer_state.json`` (epoch, history, the configuration it was trained with) and, written last,
``manifest.json`` (format ``biogen.checkpoint`` version 1, the size and SHA-256 of each file; see
:mod:`biogen._io`). Each checkpoint is written into a new folder beside the old one and swapped in
whole, so a crash or Ctrl-C leaves the previous checkpoint complete; loading verifies the manifest
first, so a damaged file is reported by name (truncated, corrupt) rather than as a library error.
Under torchrun only rank 0 writes (then every rank waits), and every rank reads; the states hold no
per-rank data, so a checkpoint resumes with any number of processes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from . import distributed as bdist
from ._io import MANIFEST, load_safetensors, read_json, replacing_dir, torch_load, verify_folder, write_manifest
from .errors import BiogenError, IncompatibleError, MissingFileError
from .utils import write_json

__all__ = ["save_training_state", "load_training_state", "verify_checkpoint", "checkpoint_note"]

_STATE = "trainer_state.json"
FORMAT, VERSION = "biogen.checkpoint", 1
_WHAT = "training checkpoint"
_REDO = "start the run again without resuming"


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
        with replacing_dir(folder, overwrite=True, only_if=(MANIFEST, _STATE)) as tmp:
            save_file(_flat(modules), str(tmp / "weights.safetensors"))
            torch.save({k: o.state_dict() for k, o in optimizers.items()}, tmp / "optim.pt")
            torch.save({k: g.get_state() for k, g in generators.items()}, tmp / "rng.pt")
            write_json(tmp / _STATE, state)
            write_manifest(tmp, FORMAT, VERSION)
    bdist.barrier()


def verify_checkpoint(folder) -> dict:
    """Check a checkpoint folder (complete, sizes and checksums as saved); return its trainer state."""
    folder = Path(folder)
    if not (folder / _STATE).exists() and not (folder / MANIFEST).exists():
        raise MissingFileError(f"holds no checkpoint ({_STATE} is missing)", path=folder,
                               hint="start the run without resuming, or point to the folder of the earlier run")
    verify_folder(folder, FORMAT, version=VERSION, what=_WHAT, redo=_REDO)
    return read_json(folder / _STATE, what="trainer state", hint=_REDO)


def checkpoint_note(folder, resume: str, *, verify=verify_checkpoint, epochs_done=None) -> str:
    """What an interrupted run kept in ``folder``: the intact checkpoint and the command that resumes
    it (``resume``), or that there is none. ``verify(folder)`` checks it and returns its trainer state;
    ``epochs_done(state)``: the epochs it holds (default: ``state["epoch"]``)."""
    try:
        state = verify(folder)
        epoch = epochs_done(state) if epochs_done else state.get("epoch")
    except (BiogenError, KeyError, TypeError, AttributeError):
        return f"no complete checkpoint in {folder}; run the same command again to start over"
    after = f" (after epoch {epoch})" if isinstance(epoch, int) else ""
    return f"the last checkpoint{after} in {folder} is intact (checksums verified); resume with: {resume}"


def load_training_state(folder, *, modules: dict[str, Any], optimizers: dict[str, Any],
                        generators: dict[str, torch.Generator], config: Optional[dict] = None) -> dict:
    """Restore what :func:`save_training_state` wrote into the given objects; return the trainer state.

    ``modules`` may name state dicts to fill (their tensors are replaced); a name missing from the
    checkpoint is left as it is. ``config``: the configuration of this run; a checkpoint trained with
    another one is refused with an error naming the differences.
    """
    state = verify_checkpoint(folder)
    if config is not None:
        saved = state.get("config", {})
        mine = json.loads(json.dumps(config, default=str))
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if diff:
            shown = ", ".join(f"{k}: {saved.get(k)!r} vs {mine.get(k)!r}" for k in diff[:6])
            raise IncompatibleError(f"was trained with another configuration (checkpoint vs now: {shown})",
                                    path=folder, hint="resume with the same settings or start a new run")
    folder = Path(folder)
    tensors = load_safetensors(folder / "weights.safetensors", what="checkpoint weights file")
    for name, m in modules.items():
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        if not own:
            continue
        if isinstance(m, torch.nn.Module):
            try:
                m.load_state_dict(own)
            except RuntimeError as exc:  # torch lists every mismatched tensor
                raise IncompatibleError(f"holds weights of another model for {name!r} ({exc})",
                                        path=folder / "weights.safetensors", hint=_REDO) from exc
        else:
            m.clear()
            m.update(own)
    opt = torch_load(folder / "optim.pt", what="optimizer state")
    rng = torch_load(folder / "rng.pt", what="generator state")
    for what, saved, objs in (("optim.pt", opt, optimizers), ("rng.pt", rng, generators)):
        missing = sorted(set(objs) - set(saved))
        if missing:
            raise IncompatibleError(f"has no state for {missing}", path=folder / what, hint=_REDO)
    for k, o in optimizers.items():
        o.load_state_dict(opt[k])
    for k, g in generators.items():
        g.set_state(rng[k])
    return state
