"""group_norm_silu (C++ CPU kernel) vs F.group_norm -> FiLM -> F.silu at diffusion UNet shapes.

Run: PYTHONPATH=python python -m pytest benchmarks/bench_group_norm.py --benchmark-only
Each case times the fused op and the unfused PyTorch chain interleaved in the same rounds of >= 50 ms
of calls (``conftest.compare``); extra_info holds ``speedup_vs_torch`` (ratio of medians) with its
per-round ``_range`` and ``_iqr``, the peak memory each side allocates (torch profiler) and the
fused op's effective bandwidth (minimal bytes: read x, write y; backward also reads dy and x and
writes dx).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from biogen.ops import group_norm_silu
from biogen.ops.group_norm import OP
from conftest import compare

# UNet blocks of a 64x64 diffusion model (RNA-CDM base stage): batch 8, 32 groups
SHAPES = [(8, 128, 64, 64), (8, 256, 32, 32), (8, 128, 32, 32), (8, 256, 64, 64)]
GROUPS = 32


def unfused(x, w, b, sc, sh):
    return F.silu(F.group_norm(x, GROUPS, w, b, eps=1e-5) * (1 + sc[:, :, None, None]) + sh[:, :, None, None])


def fused(x, w, b, sc, sh):
    return group_norm_silu(x, GROUPS, w, b, scale=sc, shift=sh, backend="cpu")


def make(shape, requires_grad):
    g = torch.Generator().manual_seed(0)
    B, C = shape[:2]
    x = torch.randn(shape, generator=g) * 2 + 0.5
    w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    sc, sh = 0.3 * torch.randn(B, C, generator=g), 0.3 * torch.randn(B, C, generator=g)
    ts = [x, w, b, sc, sh]
    if requires_grad:
        ts = [t.requires_grad_(True) for t in ts]
    return ts, torch.randn(shape, generator=g)


def step(fn, args, gout, mode):
    if mode == "fwd":
        with torch.no_grad():
            return fn(*args)
    y = fn(*args)
    return torch.autograd.grad(y, args, gout)


def peak_bytes(fn) -> int:
    """Peak bytes torch allocates on the CPU during fn(): running sum of each event's own allocations
    and frees, in time order (the profiler attributes frees to ``[memory]`` events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_group_norm_silu(benchmark, shape, mode):
    if "cpu" not in OP.reasons:
        pytest.skip("C++ kernel not built")
    args, gout = make(shape, mode != "fwd")
    with torch.no_grad():  # the two sides compute the same thing before either is timed
        torch.testing.assert_close(fused(*args), unfused(*args), rtol=1e-4, atol=1e-4)
    benchmark.group = f"group_norm_silu {mode} {'x'.join(map(str, shape))}"
    res = compare(benchmark, {"torch": lambda: step(unfused, args, gout, mode),
                              "biogen": lambda: step(fused, args, gout, mode)}, ours="biogen")
    n = args[0].numel() * args[0].element_size()
    moved = 2 * n if mode == "fwd" else 5 * n
    info = benchmark.extra_info
    info["gb_per_s"] = moved / res.median("biogen") / 1e9
    info["peak_mem_bytes"] = peak_bytes(lambda: step(fused, args, gout, mode))
    info["torch_peak_mem_bytes"] = peak_bytes(lambda: step(unfused, args, gout, mode))
