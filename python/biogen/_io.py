"""Read a file or raise one clear error naming it; write model folders that can be verified.

Every reader here turns what a library raises for a damaged file (a ``SafetensorError``, a
``JSONDecodeError`` without the file's name, a zip error from ``torch.load``) into a
:class:`~biogen.errors.CorruptFileError` that says which file, what is wrong with it and what to do.

A folder biogen saves (a model, a checkpoint) ends with ``manifest.json``, written last: its format
name and version, and the size and SHA-256 of every other file. :func:`verify_folder` checks them
before anything is loaded, so a truncated file is reported as truncated, an interrupted save as
incomplete, and a folder of another kind or a newer format as such.
:func:`replacing_dir` writes such a folder beside its destination and swaps it in whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import CorruptFileError, IncompatibleError, MissingFileError, OutputExistsError

__all__ = ["MANIFEST", "check_file", "read_json", "read_h5ad", "read_csv", "check_safetensors", "load_safetensors", "safetensors_metadata",
           "save_safetensors", "load_safetensors_verified", "torch_load", "write_manifest", "verify_folder", "check_output_dir", "check_output_file", "replacing_dir", "swap_in"]

MANIFEST = "manifest.json"
_ST_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header


def check_file(path: Path, what: str) -> int:
    """The size of ``path``; clear errors for a missing file, a folder, or an empty file."""
    if not path.exists():
        raise MissingFileError(f"{what} does not exist", path=path)
    if not path.is_file():
        raise CorruptFileError(f"is a folder, not a {what}", path=path)
    size = path.stat().st_size
    if size == 0:
        raise CorruptFileError(f"is empty (0 bytes): the {what} was not written completely",
                               path=path, hint="restore it from a copy or write it again")
    return size


def read_json(path: str | os.PathLike, *, what: str = "JSON file", hint: Optional[str] = None) -> Any:
    """Parse a JSON file; a missing, empty or malformed one is reported with its name and position."""
    path = Path(path)
    check_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"is not a text {what} ({exc.reason} at byte {exc.start})", path=path,
                               hint=hint or "restore it from a copy or write it again") from exc
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", path=path,
                               hint=hint or "fix or restore the file, or write it again") from exc


def read_h5ad(path: str | os.PathLike, *, what: str = ".h5ad file"):
    """``anndata.read_h5ad`` of a file that must exist, be named ``*.h5ad`` and parse; errors name it."""
    import anndata as ad

    from .errors import InputError

    path = Path(path)
    if path.suffix != ".h5ad":
        raise InputError("is not an .h5ad file", path=path, hint="pass AnnData saved with write_h5ad")
    check_file(path, what)
    try:
        return ad.read_h5ad(path)
    except Exception as exc:  # h5py / anndata raise many types for a damaged file, none naming it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CorruptFileError(f"could not be read as AnnData ({type(exc).__name__}: {first})", path=path,
                               hint="check that it is a complete .h5ad file") from exc


def read_csv(path: str | os.PathLike, *, what: str = "CSV file"):
    """``pandas.read_csv`` of a file that must exist and parse; errors name the file."""
    import pandas as pd

    path = Path(path)
    check_file(path, what)
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptFileError(f"could not be read as a {what} ({first})", path=path,
                               hint="pass a comma-separated text file with a header row") from exc


def check_safetensors(path: str | os.PathLike, *, what: str = "safetensors file") -> dict:
    """Check the structure of a safetensors file against its size; return its header.

    The header records where every tensor ends, so a file cut short is reported as truncated (with
    both sizes) before the library reads it, and a file of another format as such.
    """
    path = Path(path)
    size = check_file(path, what)
    hint = "the file was damaged or cut short (an interrupted copy or save?); restore it or save the model again"
    if size < 8:
        raise CorruptFileError(f"is truncated ({size} bytes; a safetensors file has at least 8)", path=path, hint=hint)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        first = f.read(1)
        if first != b"{" or n > _ST_MAX_HEADER or n < 2:
            raise CorruptFileError("is not a safetensors file (no safetensors header at its start)", path=path,
                                   hint=f"pass a {what} written by biogen")
        if 8 + n > size:
            raise CorruptFileError(f"is truncated ({size} bytes; its header alone needs {8 + n})", path=path,
                                   hint=hint)
        raw = first + f.read(n - 1)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise CorruptFileError(f"has a damaged safetensors header ({type(exc).__name__})", path=path,
                               hint=hint) from exc
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise CorruptFileError(f"is truncated ({size} of {expected} bytes)", path=path, hint=hint)
    if size > expected:
        raise CorruptFileError(f"has {size - expected} bytes more than its header describes", path=path, hint=hint)
    return header


def safetensors_metadata(path: str | os.PathLike, *, what: str = "safetensors file") -> dict:
    """The ``__metadata__`` strings of a checked safetensors file."""
    return dict(check_safetensors(path, what=what).get("__metadata__") or {})


def load_safetensors(path: str | os.PathLike, *, device: str = "cpu", what: str = "safetensors file") -> dict:
    """``safetensors.torch.load_file`` after :func:`check_safetensors`; library errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path, what=what)
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as exc:
        raise CorruptFileError(f"could not be read as safetensors ({exc})", path=path,
                               hint="restore it or save the model again") from exc


def _tensor_digest(tensors: dict) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the tensors, in name order."""
    import torch

    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_safetensors(tensors: dict, path: str | os.PathLike, *, fmt: str, version: int,
                     metadata: Optional[dict] = None) -> Path:
    """A single-file model: tensors plus string ``metadata``, with the format, its version and a
    SHA-256 of the tensors in the header; written atomically."""
    from safetensors.torch import save_file

    from .utils import atomic_path

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), "kind": fmt, "format_version": str(version), "sha256": _tensor_digest(tensors)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_safetensors_verified(path: str | os.PathLike, *, fmt: str, version: int, what: str,
                              device: str = "cpu", redo: str = "save it again") -> tuple[dict, dict]:
    """Load what :func:`save_safetensors` wrote: ``(tensors, metadata)``, after checking the size, the
    format, its version and the checksum. Files of an older biogen (a ``kind`` but no checksum) get the
    size check only."""
    meta = safetensors_metadata(path, what=what)
    if meta.get("kind") != fmt:
        raise IncompatibleError(f"is not a {what} (it holds {meta.get('kind') or 'no biogen format'!r})", path=path,
                                hint=f"pass a {what}")
    saved_version = int(meta.get("format_version", "0") or 0)
    if saved_version > version:
        raise IncompatibleError(f"has format version {saved_version}; this biogen reads up to {version}", path=path,
                                hint="upgrade biogen")
    tensors = load_safetensors(path, device=device, what=what)
    if "sha256" in meta and _tensor_digest(tensors) != meta["sha256"]:
        raise CorruptFileError("is corrupt (its tensors' SHA-256 differs from the one saved with them)", path=path,
                               hint=f"restore it from a copy or {redo}")
    return tensors, meta


def torch_load(path: str | os.PathLike, *, map_location: Any = "cpu", what: str = "torch file") -> Any:
    """``torch.load(weights_only=True)`` (no code runs); a damaged file is named, not a zip traceback."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    check_file(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptFileError(f"could not be read as a {what}: it is truncated, damaged or holds more than "
                               f"tensors ({first})", path=path, hint="restore it or write it again") from exc


# ------------------------------------------------------------------------------------ manifests


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike, fmt: str, version: int, *, files: Optional[list[str]] = None,
                   **fields) -> dict:
    """Write ``folder/manifest.json`` (last, atomically): ``fmt``, ``version``, ``fields`` and the size and
    SHA-256 of ``files`` (names relative to ``folder``; default: every other file below it)."""
    from ._version import __version__
    from .utils import write_json

    folder = Path(folder)
    if files is None:
        files = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))
                 if p.is_file() and p != folder / MANIFEST and not p.name.endswith(".tmp")]
    files = {rel: {"bytes": (folder / rel).stat().st_size, "sha256": _sha256(folder / rel)} for rel in files}
    manifest = {"format": fmt, "version": version, "biogen": __version__, **fields, "files": files}
    write_json(folder / MANIFEST, manifest)
    return manifest


def verify_folder(folder: str | os.PathLike, fmt: str, *, version: int, what: str,
                  redo: str = "write it again") -> dict:
    """Check a folder written with :func:`write_manifest`; return its manifest.

    fmt / version: the format expected and the newest version this biogen reads; what: how to name
    the folder in messages ("annotator model folder"); redo: what the user should do to get a good one.
    """
    folder = Path(folder)
    if not folder.exists():
        raise MissingFileError(f"{what} does not exist", path=folder)
    if not folder.is_dir():
        raise CorruptFileError(f"is a file, not a {what}", path=folder)
    mpath = folder / MANIFEST
    if not mpath.exists():
        raise CorruptFileError(f"has no {MANIFEST}: it is not a complete {what} (its save was interrupted, or "
                               "it was written by another program or an older biogen)", path=folder, hint=redo)
    m = read_json(mpath, what="manifest", hint=redo)
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
        raise CorruptFileError("is not a biogen manifest", path=mpath, hint=redo)
    if m.get("format") != fmt:
        raise IncompatibleError(f"holds a {m.get('format')!r} folder, not a {what} ({fmt!r})", path=folder,
                                hint=f"pass a {what}")
    if not isinstance(m.get("version"), int) or m["version"] > version:
        raise IncompatibleError(f"has format version {m.get('version')!r}; this biogen reads up to {version}",
                                path=folder, hint=f"upgrade biogen (it was written by biogen {m.get('biogen')})")
    redo_hint = f"the folder was damaged after it was saved; restore it from a copy or {redo}"
    for rel, rec in m["files"].items():
        p = folder / rel
        if not p.is_file():
            raise MissingFileError(f"is missing from the {what}", path=p, hint=redo_hint)
        size = p.stat().st_size
        if size < rec["bytes"]:
            raise CorruptFileError(f"is truncated ({size} of {rec['bytes']} bytes)", path=p, hint=redo_hint)
        if size > rec["bytes"]:
            raise CorruptFileError(f"is {size} bytes, {rec['bytes']} were saved", path=p, hint=redo_hint)
        if _sha256(p) != rec["sha256"]:
            raise CorruptFileError("is corrupt (its SHA-256 differs from the one saved in manifest.json)",
                                   path=p, hint=redo_hint)
    return m


# --------------------------------------------------------------------------- replacing folders


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output folder that exists, is not empty and may not be replaced; returns the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError("exists and is not a folder", path=path, hint="choose a folder name for --out")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExistsError("is not empty", path=path, hint="choose another --out, or pass --overwrite to replace it")
    return path


def check_output_file(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output file that exists and may not be replaced; returns the path."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError("exists", path=path, hint="choose another --out, or pass --overwrite to replace it")
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def swap_in(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make folder ``new`` become ``target``, replacing all of what ``target`` held.

    Where the OS can exchange two names the swap is a single step; elsewhere ``target`` is renamed
    aside first, so a crash between the two renames leaves the old content in ``.<name>.old-*``.
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds what target held
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def replacing_dir(target: str | os.PathLike, *, overwrite: bool = False,
                  only_if: Optional[tuple[str, ...]] = None) -> Iterator[Path]:
    """Yield an empty folder beside ``target``; when the block succeeds it replaces ``target`` whole.

    An exception or Ctrl-C in the block leaves ``target`` exactly as it was. ``only_if``: names of which
    a non-empty ``target`` must hold one (e.g. a saved model's ``manifest.json``) to be replaced, so
    that a library call never deletes a folder of other files.
    """
    target = Path(target)
    check_output_dir(target, overwrite)
    if only_if and target.is_dir() and any(target.iterdir()) and not any((target / n).exists() for n in only_if):
        raise OutputExistsError(f"holds other files (none of {list(only_if)})", path=target,
                                hint="save into a new or empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.new-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
