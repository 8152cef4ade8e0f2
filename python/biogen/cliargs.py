"""The pieces every ``biogen`` subcommand builds its parser from, so that options mean and spell the same.

A feature's ``cli.py`` defines ``add_cli(subparsers)``: :func:`command_group` adds its command with
sub-actions; the helpers below add the shared options (``--out``, ``--overwrite``, ``--seed``,
``--device``, ``--no-progress``, ``--resume``). :mod:`biogen.cli` only assembles the features.
"""

from __future__ import annotations

import argparse

__all__ = ["command_group", "add_out", "add_seed", "add_device", "resolve_device", "add_no_progress", "add_resume"]


def command_group(sub, name: str, *, help: str, description: str, metavar: str = "ACTION"):
    """Add ``biogen NAME`` with sub-actions; without one it prints its help and exits with 2."""
    top = sub.add_parser(name, help=help, description=description)
    actions = top.add_subparsers(dest=f"{name}_command", metavar=metavar)

    def _help(args, _p=top):
        _p.print_help()
        return 2

    top.set_defaults(func=_help)
    return actions


def add_out(p: argparse.ArgumentParser, help: str = "output folder (must be empty or absent unless --overwrite)", *,
            default=None, overwrite: bool = True) -> None:
    """``--out`` (required unless it has a default) and, with ``overwrite``, ``--overwrite``."""
    p.add_argument("--out", required=default is None, default=default, help=help)
    if overwrite:
        p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output folder")


def add_seed(p: argparse.ArgumentParser, help: str = "random seed (default 0)", default=0) -> None:
    p.add_argument("--seed", type=int, default=default, help=help)


def add_device(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--device", default=default, help="torch device: cpu, cuda, cuda:1, or auto = the GPU when torch "
                   f"sees one, else the CPU; under torchrun each process's own (default: {default})")


def resolve_device(name: str):
    """The torch device for ``--device``; under torchrun each process's own (see :mod:`biogen.distributed`):
    ``cpu`` trains on CPUs with Gloo, anything else on the process's GPU (``LOCAL_RANK``) with NCCL.
    A device torch cannot use is refused here, before any work."""
    import torch

    from . import distributed as bdist
    from .errors import InputError

    if bdist.launched_by_torchrun():
        bdist.init("gloo" if name == "cpu" or not torch.cuda.is_available() else "nccl")
        return torch.device("cpu") if name == "cpu" else bdist.device()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"--device {name!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s) here",
                         hint="use --device cpu or auto")
    return dev


def add_no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_resume(p: argparse.ArgumentParser, help: str) -> None:
    """``--resume``: continue an interrupted run from the checkpoint in ``--out``."""
    p.add_argument("--resume", action="store_true", help=help)
