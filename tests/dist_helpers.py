"""Launching real multi-process (Gloo) runs under ``torchrun`` from the tests.

The children import the very ``biogen`` the test process imported (an installed wheel in CI, ``python/``
with a built ``_C`` in a development tree), not ``python/`` of the checkout: a fresh clone has no
``_C`` there, and the ops would silently run on the ``torch`` fallback. Every child reports which
``biogen`` it imported and every auto-selection that passed over the C++ ``cpu`` backend; the launch
helpers fail the test when a child differs from the test process (:func:`check_children`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import biogen
from biogen.ops import _runtime

# the folder that holds the biogen package this process imported (site-packages, or python/)
PYTHON_DIR = Path(biogen.__file__).resolve().parents[1]

# Written by every child at exit (when $BIOGEN_TEST_REPORT_DIR is set): which biogen it imported,
# whether its _C loaded, and the auto-selections that skipped the C++ cpu backend (the runtime logs
# those at debug level; the filter records them without letting them reach the child's own handlers).
_REPORT = '''
import atexit, json, logging, os, sys
_report_dir = os.environ.get("BIOGEN_TEST_REPORT_DIR")
if _report_dir:
    _skipped_cpu = []

    class _RecordCpuSkips(logging.Filter):
        def filter(self, record):
            msg = record.getMessage()
            if record.levelno == logging.DEBUG and ": skipping backend cpu: " in msg:
                if msg not in _skipped_cpu:
                    _skipped_cpu.append(msg)
                return logging.getLogger().getEffectiveLevel() <= logging.DEBUG
            return True

    _ops_log = logging.getLogger("biogen.ops")
    _ops_log.setLevel(logging.DEBUG)
    _ops_log.addFilter(_RecordCpuSkips())

    @atexit.register
    def _write_report():
        if "biogen" not in sys.modules:  # the torchrun launcher itself
            return
        rt = sys.modules.get("biogen.ops._runtime")
        rep = {"pid": os.getpid(), "rank": os.environ.get("RANK"),
               "biogen": os.path.dirname(os.path.abspath(sys.modules["biogen"].__file__)),
               "ops_imported": rt is not None, "c_loaded": rt is not None and rt._C is not None,
               "c_error": getattr(rt, "_C_ERROR", None), "skipped_cpu": _skipped_cpu}
        with open(os.path.join(_report_dir, f"{os.getpid()}.json"), "w") as f:
            json.dump(rep, f)
'''

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


def child_env(hook_dir: Path) -> dict:
    """Environment for a child Python process: the test process's biogen first on PYTHONPATH, one
    thread, no inherited torchrun variables, and the start-up hook (``hook_dir/sitecustomize.py``)
    that writes the child's report into ``hook_dir/reports``."""
    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "reports").mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(_REPORT + _GUARD)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in [str(hook_dir), str(PYTHON_DIR), os.environ.get("PYTHONPATH")] if p),
           "BIOGEN_TEST_REPORT_DIR": str(hook_dir / "reports")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "BIOGEN_TEST_RANK0_ONLY"):
        env.pop(k, None)
    return env


def check_children(hook_dir: Path, expected: int) -> list[dict]:
    """Fail unless ``expected`` children reported, each imported this process's biogen and, where
    this process has the compiled kernels, loaded ``_C`` and never passed over the C++ cpu backend."""
    reports = [json.loads(p.read_text()) for p in sorted((hook_dir / "reports").glob("*.json"))]
    assert len(reports) >= expected, f"{len(reports)} of {expected} child processes reported back"
    ours = os.path.dirname(os.path.abspath(biogen.__file__))
    for rep in reports:
        who = f"child (rank {rep['rank']}, pid {rep['pid']})"
        assert rep["biogen"] == ours, f"{who} imported biogen from {rep['biogen']}, the tests from {ours}"
        if _runtime._C is not None and rep["ops_imported"]:
            assert rep["c_loaded"], f"{who} has no biogen._C: {rep['c_error']}"
        if _runtime._C is not None:
            assert not rep["skipped_cpu"], f"{who} ran the torch fallback instead of the C++ kernels: {rep['skipped_cpu']}"
    return reports


def run_python(script: Path, args: list[str], *, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python script args`` in one child process, checked as the torchrun ranks are."""
    with tempfile.TemporaryDirectory(prefix="biogen_child_") as tmp:
        r = subprocess.run([sys.executable, str(script), *args], env=child_env(Path(tmp)), capture_output=True,
                           text=True, timeout=timeout)
        if r.returncode == 0:
            check_children(Path(tmp), 1)
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], *, module: Optional[str] = "biogen.cli", script: Optional[Path] = None,
             rank0_only: Optional[Path] = None, guard_dir: Optional[Path] = None,
             timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=nproc -m module args`` (or ``script args``).

    ``rank0_only``: a folder the ranks other than 0 must not create anything in (needs ``guard_dir``,
    an empty folder for the start-up hook; a temporary one otherwise). Every rank is checked with
    :func:`check_children` when the run succeeds. One retry when the run fails: the free port may be taken
    between probing and binding.
    """
    if rank0_only is not None and guard_dir is None:
        raise ValueError("rank0_only needs guard_dir")
    if guard_dir is None:
        with tempfile.TemporaryDirectory(prefix="biogen_torchrun_") as tmp:
            return torchrun(nproc, args, module=module, script=script, guard_dir=Path(tmp), timeout=timeout)
    hook_dir = guard_dir
    env = child_env(hook_dir)
    if rank0_only is not None:
        env["BIOGEN_TEST_RANK0_ONLY"] = str(rank0_only)
    target = [str(script)] if script is not None else ["-m", module]
    for attempt in range(2):
        for old in (hook_dir / "reports").glob("*.json"):
            old.unlink()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc_per_node={nproc}",
               "--master_addr", "127.0.0.1", f"--master_port={free_port()}", *target, *args]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode == 0 or "address already in use" not in (r.stderr + r.stdout).lower():
            break
    if r.returncode == 0:
        check_children(hook_dir, nproc)
    return r
