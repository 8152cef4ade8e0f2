"""The ``biogen`` command. Each feature module adds its subcommands through ``add_cli(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Optional, Sequence

# Modules that contribute subcommands: each defines add_cli(subparsers) and sets a ``func`` default
# on its parsers taking the parsed args and returning an exit code.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "biogen.selfcheck",
    "biogen.gpucheck",
    "biogen.sc.cli",
    "biogen.models.tumorsynth.cli",
    "biogen.tabular.cli",
    "biogen.models.pumamednet.cli",
    "biogen.models.rna_cdm.cli",
)


class CLIError(Exception):
    """A user error: printed without a traceback, exit code 2."""


def _cmd_info(args: argparse.Namespace) -> int:
    from ._info import format_info, info

    d = info()
    print(json.dumps(d, indent=2, default=str) if args.json else format_info(d))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="biogen",
        description="Generative and foundation models for computational biology, with fast kernels.",
    )
    parser.add_argument("--version", action="version", version=f"biogen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "info",
        help="show the version, what was compiled and which kernel backends can run here",
        description="Show the version, the compiled extension (SIMD levels, OpenMP, CUDA "
        "architectures) and, for each device, which backends can run and why the others cannot.",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    p.set_defaults(func=_cmd_info)
    for mod in SUBCOMMAND_MODULES:
        importlib.import_module(mod).add_cli(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from . import distributed

    rank = distributed.env_rank()
    stdout = sys.stdout
    if rank != 0:
        # Under torchrun only rank 0 reports; every rank still prints its own errors to stderr.
        sys.stdout = open(os.devnull, "w")
    try:
        return int(args.func(args) or 0)
    except (CLIError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        where = f" (rank {rank})" if distributed.launched_by_torchrun() else ""
        print(f"biogen {args.command}: error{where}: {msg}", file=sys.stderr)
        return 2
    finally:
        distributed.destroy()
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
