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
