"""Resource usage of the CUDA kernels in the installed ``biogen._C``, read with
``cuobjdump --dump-resource-usage`` (no GPU needed): per kernel and architecture, registers, static
shared memory and local memory (spills and stack arrays). Skipped, with the reason, where the
extension has no CUDA objects (built without nvcc) or no cuobjdump is found; CI builds the package
with nvcc present, so there the installed ``_C`` has them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

# Opt-in shared memory per block by architecture (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMIT = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
              120: 101376}
# Local memory per thread (bytes) above which a kernel counts as spilling badly.
LOCAL_BUDGET = 1024


def cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(p) if p.exists() else None
    except ImportError:
        return None


def parse(text: str) -> list[dict]:
    """cuobjdump --dump-resource-usage output -> one dict per (architecture, function)."""
    out, arch = [], None
    for line in text.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            out.append(dict(arch=arch, function=m.group(1)))
            continue
        if out and "REG:" in line and "registers" not in out[-1]:
            vals = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            out[-1].update(registers=int(vals["REG"]), stack=int(vals.get("STACK", 0)),
                           shared=int(vals.get("SHARED", 0)), local=int(vals.get("LOCAL", 0)))
    return out


def violations(rows: list[dict]) -> list[str]:
    bad = []
    for r in rows:
        where = f"{r['function']} on sm_{r['arch']}"
        limit = SMEM_LIMIT.get(r["arch"], 49152)
        if r["shared"] > limit:
            bad.append(f"{where}: {r['shared']} B static shared memory > {limit}")
        if r["local"] > LOCAL_BUDGET or r["stack"] > LOCAL_BUDGET:
            bad.append(f"{where}: {max(r['local'], r['stack'])} B local memory / stack per thread (spills)")
    return bad


SAMPLE = """
Fatbin elf code:
================
arch = sm_80
Resource usage:
 Common:
  GLOBAL:0
 Function _Z3addPfi:
  REG:10 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:364 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z5spillPf:
  REG:255 STACK:4096 SHARED:200000 LOCAL:4096 CONSTANT[0]:364 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parser_and_checker_flag_spills_and_shared_memory():
    rows = parse(SAMPLE)
    assert [(r["arch"], r["function"], r["registers"], r["shared"], r["local"]) for r in rows] == [
        (80, "_Z3addPfi", 10, 1024, 0), (80, "_Z5spillPf", 255, 200000, 4096)]
    bad = violations(rows)
    assert len(bad) == 2 and all("_Z5spillPf" in b for b in bad)
    assert violations(rows[:1]) == []


def test_compiled_cuda_kernels_fit_and_do_not_spill():
    from biogen.ops import _runtime

    if _runtime._C is None:
        pytest.skip("biogen._C did not import")
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's bundled copy) found")
    so = _runtime._C.__file__
    r = subprocess.run([tool, "--dump-resource-usage", so], capture_output=True, text=True)
    rows = parse(r.stdout)
    if not rows:
        pytest.skip(f"{Path(so).name} has no CUDA objects (built without nvcc): {r.stderr.strip()[:200]}")
    assert violations(rows) == []
