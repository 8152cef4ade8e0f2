"""Errors a user can act on, and how the ``biogen`` command tells them apart from bugs.

A :class:`BiogenError` names the file (when there is one), the problem and what to do; the CLI prints
it as one line and exits 2. Its subclasses also derive from the built-in type a Python caller
would expect (``ValueError``, ``FileNotFoundError``...), so library code can raise them where it
used to raise the built-in ones without breaking ``except ValueError``.

Everything else is a bug and keeps its traceback, with one bridge for the many input checks written
before this module existed: a ``ValueError`` / ``KeyError`` / ``TypeError`` / ``RuntimeError`` raised
by an explicit ``raise`` statement in biogen's own code is a worded check, so it is reported as a
user error too; the same types raised inside a library (pandas, torch, safetensors) are not, unless
biogen translated them where they occur.
"""

from __future__ import annotations

import contextlib
import linecache
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

__all__ = ["resume_command", "BiogenError", "InputError", "CorruptFileError", "MissingFileError", "OutputExistsError",
           "IncompatibleError", "Interrupted", "on_interrupt", "is_user_error", "one_line"]


class BiogenError(Exception):
    """A failure the user can fix: ``"<path>: <problem>; <what to do>"``."""

    def __init__(self, problem: str, *, path: Optional[str | os.PathLike] = None, hint: Optional[str] = None):
        self.problem, self.path, self.hint = problem, (None if path is None else str(path)), hint
        super().__init__(self._message())

    def _message(self) -> str:
        msg = f"{self.path}: {self.problem}" if self.path else self.problem
        return f"{msg}; {self.hint}" if self.hint else msg

    def __str__(self) -> str:  # OSError subclasses would otherwise format their own way
        return self._message()


class InputError(BiogenError, ValueError):
    """The input is well-formed but unusable (duplicate gene names, a missing column...)."""


class CorruptFileError(BiogenError, ValueError):
    """A file exists but cannot be read: empty, truncated, not the expected format, checksum mismatch."""


class MissingFileError(BiogenError, FileNotFoundError):
    """A file or folder the command needs does not exist."""


class OutputExistsError(BiogenError, FileExistsError):
    """The output exists and replacing it was not asked for."""


class IncompatibleError(BiogenError, ValueError):
    """A model folder or checkpoint of another model, configuration or format version."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what was kept (which checkpoint is intact, how to resume)."""


@contextlib.contextmanager
def on_interrupt(describe: Callable[[], str]) -> Iterator[None]:
    """On Ctrl-C inside the block, re-raise as :class:`Interrupted` carrying ``describe()``.

    ``describe`` runs after the interrupt, so it can look at what is on disk then (the checkpoint
    that survived), not at what was there when the block began.
    """
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt as exc:
        try:
            note = describe()
        except Exception as desc_exc:  # the interrupt matters more than a failed description
            note = f"(could not check what was kept: {type(desc_exc).__name__}: {desc_exc})"
        raise Interrupted(note) from exc


def resume_command(argv, flag: str = "--resume") -> str:
    """The command line that continues an interrupted run: ``argv`` with ``flag`` added."""
    import shlex

    argv = [a for a in argv if a != "--debug"]
    return "biogen " + " ".join(shlex.quote(str(a)) for a in argv) + ("" if flag in argv else f" {flag}")


_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep
_CHECK_TYPES = (ValueError, KeyError, TypeError, RuntimeError)


def _raised_by_biogen_check(exc: BaseException) -> bool:
    """True if the innermost frame is an explicit ``raise`` in biogen's own source."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    try:
        inside = str(Path(filename).resolve()).startswith(_PACKAGE_DIR)
    except OSError:
        return False
    return inside and linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise ")


def is_user_error(exc: BaseException) -> bool:
    """Whether the CLI reports ``exc`` as one line (True) or lets its traceback through (a bug)."""
    if isinstance(exc, (BiogenError, OSError)):  # OSError: the file system said no (missing, permission, disk full)
        return True
    return isinstance(exc, _CHECK_TYPES) and _raised_by_biogen_check(exc)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a KeyError's message without the quotes repr adds)."""
    msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if not msg.strip():
        msg = type(exc).__name__
    return "; ".join(part.strip() for part in msg.splitlines() if part.strip())
