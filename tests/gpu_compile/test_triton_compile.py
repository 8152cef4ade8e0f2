"""Every Triton kernel variant the launchers choose, compiled for sm_80 and sm_90 without a GPU.

The launchers run on ``meta`` tensors under ``recording(arch)`` (their real plans; only the launch is
skipped) and each recorded launch, with every fallback config of its plan, goes through Triton's
ahead-of-time path down to a cubin (``aot.py``, run by ``runner.py`` in a process without
TRITON_INTERPRET). Asserted per kernel: it compiles; its shared memory fits the architecture's
per-block limit and the plan's estimate bounds it (the estimate is what the launcher and
``unsupported_reasons`` decide on); register spills stay within a budget; the attention and FAVOR+
kernels contain tensor-core instructions (mma.sync / wgmma in the PTX).

The default run compiles the chosen configs of a representative subset (``cases.default_subset``:
every kernel, every dtype, the largest shapes); the full run adds every fallback config and the
whole matrix: ``pytest tests/gpu_compile -m gpu_compile_full``.
``BIOGEN_GPU_COMPILE_REPORT=path.json`` writes every result (the README's
table comes from it). Compiles are cached (``aot.CACHE``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from biogen.ops.triton import _common, masked_attention, performer  # noqa: E402

from .cases import ARCHS, default_subset, full_matrix  # noqa: E402

_TRITON_PTXAS = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
if shutil.which("ptxas") is None and not _TRITON_PTXAS.exists():
    pytest.skip("no ptxas: Triton cannot compile for NVIDIA GPUs here", allow_module_level=True)

# Bytes of spill stores / loads per thread allowed in a chosen (first-fitting) config. float16 /
# bfloat16 kernels are the fast path and must not spill beyond a few words; the float32 (3xTF32)
# kernels hold every operand twice and may spill a little more (see the README table).
SPILL_BUDGET = {"fp16": 64, "bf16": 64, "fp32": 640}
# Fallback configs run only where the preferred one does not fit: they must compile and fit.
FALLBACK_SPILL_BUDGET = 16384

# Kernels whose matrix products are the op's work: they must be on the tensor cores.
TENSOR_CORE_KERNELS = {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_key_state_kernel", "_fwd_query_kernel",
                       "_bwd_query_kernel", "_bwd_dc_kernel", "_bwd_key_kernel", "_row_max_kernel",
                       "_causal_fwd_kernel", "_causal_bwd_q_kernel", "_causal_bwd_kv_kernel"}

ROOT = Path(__file__).resolve().parents[2]


def _start(spec: dict) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-m", "tests.gpu_compile.runner", json.dumps(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen):
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def _run(spec: dict):
    return _wait(_start(spec))


def _matrix(cases, fallbacks: bool) -> list[dict]:
    """Compile results of ``cases``, one process per architecture (ptxas is single-threaded)."""
    procs = [_start(dict(cases=[list(dataclasses.astuple(c)) for c in cases], archs=[a], fallbacks=fallbacks))
             for a in ARCHS]
    return [r for p in procs for r in _wait(p)]


def _report(results):
    path = os.environ.get("BIOGEN_GPU_COMPILE_REPORT")
    if path:
        old = json.loads(Path(path).read_text()) if Path(path).exists() else []
        Path(path).write_text(json.dumps(old + results, indent=1))


def violations(results: list[dict]) -> list[str]:
    """Every broken rule in the compile results (empty: all kernels pass)."""
    bad = []
    for r in results:
        where = f"{r['case']} {r['kernel']} [{r['config']}] on {r['arch']}"
        if r["shared"] > r["arch_limit"]:
            bad.append(f"{where}: {r['shared']} B shared memory > {r['arch_limit']} B per block")
        if r["shared"] > r["estimate"]:
            bad.append(f"{where}: the plan estimated {r['estimate']} B, Triton allocates {r['shared']} B")
        budget = SPILL_BUDGET[r["dtype"]] if r["chosen"] else FALLBACK_SPILL_BUDGET
        if max(r["spill_stores"], r["spill_loads"]) > budget:
            bad.append(f"{where}: spills {max(r['spill_stores'], r['spill_loads'])} B per thread (budget {budget})")
        if r["kernel"] in TENSOR_CORE_KERNELS and r["mma_sync"] + r["wgmma"] == 0:
            bad.append(f"{where}: no tensor-core instruction (mma.sync / wgmma) in the PTX")
    return bad


def test_default_subset_compiles_fits_and_uses_tensor_cores():
    results = _matrix(default_subset(), fallbacks=False)
    _report(results)
    kernels = {r["kernel"] for r in results}
    # every Triton kernel of the two attention ops is in the subset, for both architectures
    assert TENSOR_CORE_KERNELS <= kernels, TENSOR_CORE_KERNELS - kernels
    assert {r["arch"] for r in results} == set(ARCHS)
    assert violations(results) == []


@pytest.mark.gpu_compile_full
def test_full_matrix():
    subset = set(default_subset())
    results = _matrix([c for c in full_matrix() if c not in subset], fallbacks=True) + _matrix(
        default_subset(), fallbacks=True)
    _report(results)
    assert violations(results) == []


# ----------------------------------------------------------------------------- the checks can fail


def test_checker_flags_oversized_and_dot_free_results():
    """The rules reject a result over the shared-memory limit, over its estimate, spilling, or
    without tensor-core instructions (fed synthetic results: the rules, not the compiler)."""
    good = dict(case="c", dtype="bf16", arch="sm80", arch_limit=166912, kernel="_fwd_kernel", config="x", chosen=True,
                shared=1000, estimate=2000, registers=100, spill_stores=0, spill_loads=0, stack=0, mma_sync=4, wgmma=0)
    assert violations([good]) == []
    assert "shared memory >" in violations([dict(good, shared=200000, estimate=300000)])[0]
    assert "the plan estimated" in violations([dict(good, shared=3000)])[0]
    assert "spills" in violations([dict(good, spill_stores=1024)])[0]
    assert "no tensor-core" in violations([dict(good, mma_sync=0)])[0]


def test_oversized_config_is_flagged():
    """256 x 256 tiles: the plan refuses them for an A100 (estimate over the limit), and compiled
    anyway, Triton's allocation is over the limit too (or Triton refuses), so the checker fails it."""
    huge = _common.Config.of(8, 3, BM=256, BN=256)
    p = _common.plan("masked_attention fwd", _common.SM80, [huge], masked_attention._smem("fwd", torch.bfloat16, 128))
    assert p.chosen is None and "no launch configuration fits sm_80" in p.reason()
    res = _run(dict(probe="oversized"))
    assert res["estimate"] > _common.SM80.smem_per_block
    if "error" in res:
        assert "shared" in res["error"].lower() or "resource" in res["error"].lower(), res["error"]
    else:
        assert res["shared"] > _common.SM80.smem_per_block
        assert violations([dict(case="oversized", dtype="bf16", arch="sm80", arch_limit=_common.SM80.smem_per_block,
                                kernel="_fwd_kernel", config="256x256", chosen=True, shared=res["shared"],
                                estimate=res["estimate"], registers=0, spill_stores=0, spill_loads=0, stack=0,
                                mma_sync=1, wgmma=0)])


def test_kernel_without_dot_is_flagged_as_lacking_tensor_cores():
    """group_norm's kernel has no tl.dot: the PTX check finds no tensor-core instruction, where the
    masked-attention forward (same dtype and target) has them."""
    res = _run(dict(probe="no_dot"))
    assert sum(res["group_norm"]) == 0
    assert sum(res["attention"]) > 0
    r = dict(case="gn", dtype="bf16", arch="sm90", arch_limit=232448, kernel="_fwd_kernel", config="-", chosen=True,
             shared=0, estimate=0, registers=0, spill_stores=0, spill_loads=0, stack=0, mma_sync=res["group_norm"][0],
             wgmma=res["group_norm"][1])
    assert any("no tensor-core" in v for v in violations([r]))


# ----------------------------------------------------------------------------- plans (no compile)


def test_fp32_precision_follows_torch_setting():
    """float32 inputs: 3xTF32 by default (float32 accuracy), TF32 only when torch allows it."""
    old_flag, old_prec = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        assert _common.dot_precision(torch.float32, _common.SM90) == "tf32x3"
        torch.set_float32_matmul_precision("high")
        assert _common.dot_precision(torch.float32, _common.SM90) == "tf32"
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = True
        assert _common.dot_precision(torch.float32, _common.SM90) == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_flag
        torch.set_float32_matmul_precision(old_prec)
    assert _common.dot_precision(torch.bfloat16, _common.INTERPRETER) == "f32"


@pytest.mark.parametrize("arch", [_common.SM80, _common.SM90], ids=["sm80", "sm90"])
def test_largest_shapes_have_a_plan(arch):
    """head_dim 128 with 256 or 266 features, causal or not, every dtype: a config fits."""
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert masked_attention.unsupported_reasons(dtype=dt, head_dim=128, device=arch) == []
        for m in (256, 266):
            for causal in (False, True):
                assert performer.unsupported_reasons(dtype=dt, head_dim=128, nb_features=m, causal=causal,
                                                     device=arch) == []


def test_unsupported_reasons_when_nothing_fits():
    """A GPU with too little shared memory per block: the ops say why instead of crashing."""
    tiny = _common.Arch(75, 4096)
    r = masked_attention.unsupported_reasons(dtype=torch.float32, head_dim=128, device=tiny)
    assert r and all("no launch configuration fits sm_75" in x for x in r)
    r = performer.unsupported_reasons(dtype=torch.bfloat16, head_dim=128, nb_features=256, causal=True, device=tiny)
    assert any("causal_fwd" in x for x in r)
    assert masked_attention.unsupported_reasons(dtype=torch.float64, head_dim=64, device=_common.SM90)
    assert performer.unsupported_reasons(dtype=torch.float16, head_dim=256, device=_common.SM90)


def test_launcher_refuses_instead_of_crashing_in_the_kernel():
    """Where nothing fits, the launcher raises a clear error before any launch."""
    q = torch.empty(1, 1, 64, 128, dtype=torch.float32, device="meta")
    with _common.recording(_common.Arch(75, 4096)) as rec, pytest.raises(RuntimeError, match="no launch configuration"):
        masked_attention.forward(q, q, q, None, None, 0.1)
    assert rec == []


def test_grids_are_flat_and_offsets_int64_at_large_batch():
    """batch*heads = 131,072 (past grid y's 65,535): every launch puts the work on grid x, and the
    kernels index (batch*head) in int64 (bh * L * D = 2^31 here)."""
    B, H, L, D = 4096, 32, 256, 64
    assert B * H * L * D == 2**31
    q = torch.empty(B, H, L, D, dtype=torch.bfloat16, device="meta")
    w = torch.empty(128, D, dtype=torch.float32, device="meta")
    with _common.recording(_common.SM90) as rec:
        masked_attention.forward(q, q, q, None, None, 0.1)
        performer.forward(q, q, q, w, None, False, False, 1e-4)
        performer.forward(q, q, q, w, None, True, False, 1e-4)
    assert rec and all(len(x.grid) == 1 and x.grid[0] >= B * H for x in rec)
    src = Path(masked_attention.__file__).read_text() + Path(performer.__file__).read_text()
    # masked: 4 kernels; FAVOR+: key state, dC, the row-tile and causal preambles (shared by the rest)
    assert "tl.program_id(1)" not in src and src.count("tl.program_id(0).to(tl.int64)") == 8
