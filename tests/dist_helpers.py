"""Launching real multi-process (Gloo) runs under ``torchrun`` from the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

PYTHON_DIR = Path(__file__).resolve().parents[1] / "python"

# Imported by every process at start-up when its folder is on PYTHONPATH (as sitecustomize): on
# ranks other than 0 any file or folder created inside $BIOGEN_TEST_RANK0_ONLY raises, so "only rank 0
# writes" is checked by the run failing, not by comparing identical files.
_GUARD = '''
import builtins, io, os
_root = os.environ.get("BIOGEN_TEST_RANK0_ONLY")
if _root and os.environ.get("RANK", "0") != "0":
    _root = os.path.realpath(_root)

    def _inside(p):
        try:
            p = os.path.realpath(os.fspath(p))
        except TypeError:
            return False
        return p != _root and p.startswith(_root + os.sep)

    def _deny(p):
        raise PermissionError(f"rank {os.environ['RANK']} wrote {p}: only rank 0 may write outputs")

    _open, _os_open, _mkdir, _replace, _rename = builtins.open, os.open, os.mkdir, os.replace, os.rename

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and _inside(file):
            _deny(file)
        return _open(file, mode, *a, **k)

    def os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _inside(path):
            _deny(path)
        return _os_open(path, flags, *a, **k)

    def mkdir(path, *a, **k):
        if _inside(path):
            _deny(path)
        return _mkdir(path, *a, **k)

    def replace(src, dst, *a, **k):
        if _inside(dst):
            _deny(dst)
        return _replace(src, dst, *a, **k)

    def rename(src, dst, *a, **k):
        if _inside(dst):
            _deny(dst)
        return _rename(src, dst, *a, **k)

    builtins.open = io.open = open_
    os.open, os.mkdir, os.replace, os.rename = os_open, mkdir, replace, rename
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], *, module: Optional[str] = "biogen.cli", script: Optional[Path] = None,
             rank0_only: Optional[Path] = None, guard_dir: Optional[Path] = None,
             timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=nproc -m module args`` (or ``script args``).

    ``rank0_only``: a folder the ranks other than 0 must not create anything in (needs ``guard_dir``,
    an empty folder for the start-up hook). One retry when the run fails: the free port may be taken
    between probing and binding.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PYTHON_DIR) + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "BIOGEN_TEST_RANK0_ONLY"):
        env.pop(k, None)
    if rank0_only is not None:
        if guard_dir is None:
            raise ValueError("rank0_only needs guard_dir")
        guard_dir.mkdir(parents=True, exist_ok=True)
        (guard_dir / "sitecustomize.py").write_text(_GUARD)
        env["PYTHONPATH"] = str(guard_dir) + os.pathsep + env["PYTHONPATH"]
        env["BIOGEN_TEST_RANK0_ONLY"] = str(rank0_only)
    target = [str(script)] if script is not None else ["-m", module]
    for attempt in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc_per_node={nproc}",
               "--master_addr", "127.0.0.1", f"--master_port={free_port()}", *target, *args]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode == 0 or "address already in use" not in (r.stderr + r.stdout).lower():
            return r
    return r
