"""Shared by the kernel tests: which backends can run here, on which device, and error measures."""

from __future__ import annotations

import pytest
import torch

from biogen.ops import _runtime

ALL_BACKENDS = ["torch", "cpu", "triton", "cuda"]


def device_for(backend: str) -> torch.device:
    if backend in ("cuda", "triton") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def interpreted(backend: str) -> bool:
    """Triton on the CPU runs in its interpreter, ~1000x slower: tests shrink shapes for it."""
    return backend == "triton" and device_for(backend).type == "cpu"


def require(op: "_runtime.KernelOp", backend: str, **inputs) -> torch.device:
    """Skip (with the reasons) unless ``op`` can run on ``backend`` here; return its device."""
    dev = device_for(backend)
    reasons = op.not_supported_reasons(backend, dev, **inputs)
    if reasons:
        pytest.skip(f"{backend} unavailable: {'; '.join(reasons)}")
    return dev


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max())


def assert_close_2x(out, out_lowp_ref, out_truth, atol=1e-5):
    """FlashAttention's rule for low precision: the kernel's error against the float64 truth is at
    most twice that of the reference computed in the same low precision (plus a small floor)."""
    err = max_err(out, out_truth)
    ref_err = max_err(out_lowp_ref, out_truth)
    assert err <= 2 * ref_err + atol, f"kernel error {err:.3e} > 2 x reference error {ref_err:.3e} + {atol}"


CPU_CAPS = ["base", "avx2", "avx512", "avx512_bf16"]


def run_with_cpu_capability(op: "_runtime.KernelOp", cap: str, body: str) -> None:
    """Run ``body`` (Python source) in a subprocess whose C++ kernels are forced to the ``cap``
    build (BIOGEN_CPU_CAPABILITY), so every per-ISA build is tested on one machine. Skips when the
    op has no C++ kernel, ``cap`` was not compiled, or this CPU lacks it; fails with the child's
    stderr if ``body`` raises."""
    import os
    import subprocess
    import sys

    if "cpu" not in op.reasons:
        pytest.skip("C++ kernel not built")
    info = _runtime.build_info()
    if cap not in info["cpu_capabilities_compiled"].split(","):
        pytest.skip(f"{cap} not compiled on this platform")
    if CPU_CAPS.index(cap) > CPU_CAPS.index(info["cpu_capability_hardware"]):
        pytest.skip(f"this CPU lacks {cap}")
    code = (f"import sys; sys.path[:0] = {sys.path!r}\n"
            "import torch\nfrom biogen.ops import build_info\n"
            f"assert build_info()['cpu_capability'] == {cap!r}\n" + body)
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, BIOGEN_CPU_CAPABILITY=cap),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
