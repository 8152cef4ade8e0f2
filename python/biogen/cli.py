"""The ``biogen`` command. Each feature module adds its subcommands through ``add_cli(subparsers)``."""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import sys
import traceback
from typing import Optional, Sequence

from .errors import BiogenError, Interrupted, is_user_error, one_line

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


# A user error raised by a subcommand: one line, exit code 2 (kept as a name for existing callers).
CLIError = BiogenError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


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
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: BIOGEN_DEBUG=1); may be given anywhere")
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


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Take ``--debug`` from anywhere before ``--``, so it works after the subcommand too."""
    stop = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:stop]
    return [a for i, a in enumerate(argv) if i >= stop or a != "--debug"], debug


def _label(argv: list[str]) -> str:
    """``biogen annotate predict``: the command words, for the error line."""
    words = []
    for a in argv:
        if a.startswith("-") or len(words) == 2:
            break
        words.append(a)
    return " ".join(["biogen"] + words)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``biogen`` command; return its exit code.

    Expected failures (:func:`biogen.errors.is_user_error`) print one line naming the file, the problem
    and what to do, and return 2; Ctrl-C prints what was kept and how to resume, and returns 130.
    ``--debug`` or ``BIOGEN_DEBUG=1`` adds the traceback. Any other exception is a bug: it propagates
    with its traceback.
    """
    argv, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    debug = debug or os.environ.get("BIOGEN_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # for the resume command an interrupted training prints
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    from . import distributed

    rank = distributed.env_rank()
    where = f" (rank {rank})" if distributed.launched_by_torchrun() else ""
    label = _label(argv)
    stdout = sys.stdout
    if rank != 0:
        # Under torchrun only rank 0 reports; every rank still prints its own errors to stderr.
        sys.stdout = open(os.devnull, "w")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        if debug:
            traceback.print_exc()
        kept = one_line(exc) if isinstance(exc, Interrupted) else \
            "stopped before finishing; outputs are only written once complete, so earlier ones are as they were"
        # a newline first: Ctrl-C usually lands in the middle of a progress bar's line
        report, code = f"\n{label}: interrupted{where}: {kept}", EXIT_INTERRUPTED
    except Exception as exc:
        if not is_user_error(exc):
            raise
        if debug:
            traceback.print_exc()
        report, code = f"{label}: error{where}: {one_line(exc)}", EXIT_USER_ERROR
    finally:
        distributed.destroy()
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
    # Printed once the exception and its frames are gone: progress bars still open in them close
    # (and print their last state) first, so this stays the last line.
    gc.collect()
    print(report, file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
