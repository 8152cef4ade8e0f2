"""Masked gene attention (SPEC 1.1) on the CPU: the biogen C++ kernel against PyTorch SDPA.

Run (``benchmarks/`` is outside the test paths)::

    PYTHONPATH=python python -m pytest benchmarks/bench_masked_attention.py --benchmark-only

Variants, timed interleaved in the same rounds (``conftest.compare``: rounds of >= 50 ms of calls,
warm-up first), per shape and per mode (``fwd`` under ``torch.no_grad``; ``fwd+bwd``):

- ``sdpa-dense-mask``: ``F.scaled_dot_product_attention`` with the equivalent (B, 1, L, L) bool mask
  built from the same padding and known/unknown flags: what a user would otherwise write. Padded
  query rows are allowed their own key so the baseline has no NaN rows (their values are ignored).
- ``sdpa-no-mask``: SDPA with no mask at all, the dense floor (it computes a different, wrong
  attention; it only shows what a masked kernel costs against doing all L x L work unmasked).
- ``biogen-cpu``: ``masked_gene_attention(backend="cpu")``.

``extra_info`` of every benchmark (one per shape and mode; pytest-benchmark's statistics are the
kernel's) holds, besides ``conftest.compare``'s ratios with their spread:

- ``<variant>_gflops_useful``: 4 D x (number of allowed (query, key) pairs) per head for the forward, and 2.5x
  that more for the backward (FlashAttention's convention), divided by the median time. Every
  variant is charged the same useful work, so the dense baselines' figure is an effective rate.
- ``matmul_gflops``: this machine's float32 ``torch.mm`` 2048 x 2048 rate, measured in the same run.
- ``<variant>_peak_rss_delta_mib``: extra peak resident memory of one call, measured honestly for a kernel
  that does not allocate through torch: a fresh subprocess (Linux) builds the inputs and, for the
  baseline, the dense mask, resets the resident high-water mark (``/proc/self/clear_refs``), runs
  the call once and reads ``VmHWM``. The delta is the call's peak above everything already resident
  (its outputs, gradients and any thread-pool start-up included).
- ``speedup_vs_<baseline>`` (ratio of medians) with ``_range`` / ``_iqr`` over the rounds, and
  ``cpu_time_ratio_vs_<baseline>``, the same with process CPU time (all threads summed), which is
  the steadier figure when other jobs share the cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from conftest import ROUNDS, compare

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


@dataclass(frozen=True)
class AttnShape:
    """One benchmark case. scGPT (SPEC 1.1 / 2.2): d_model 512 with 8 heads -> head_dim 64;
    sequence lengths 1200 (scGPT's max_seq_len) to 3001 (its longest configuration)."""

    name: str
    batch: int = 8
    heads: int = 8
    length: int = 1200
    head_dim: int = 64
    dtype: torch.dtype = torch.float32
    unknown_frac: float = 0.4  # scGPT generative pretraining: 40% of genes to generate
    min_len_frac: float = 0.5  # cells padded to the longest; lengths uniform in [0.5 L, L]
    rounds: int = ROUNDS


SHAPES = {
    "scgpt-L1200": AttnShape("scgpt-L1200", length=1200),
    "scgpt-L3001": AttnShape("scgpt-L3001", length=3001, rounds=min(ROUNDS, 3)),
}
VARIANTS = ("sdpa-dense-mask", "sdpa-no-mask", "biogen-cpu")  # baselines first: ours reports ratios
MODES = ("fwd", "fwd+bwd")


def make_inputs(shape: AttnShape, *, seed: int = 0):
    """q, k, v (B, H, L, D); padding (B, L) True = pad; known (B, L) True = known (<cls> known)."""
    g = torch.Generator().manual_seed(seed)
    B, H, L, D = shape.batch, shape.heads, shape.length, shape.head_dim
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(shape.dtype) for _ in range(3))
    lengths = torch.randint(int(L * shape.min_len_frac), L + 1, (B,), generator=g)
    lengths[0] = L  # the batch is padded to its longest cell
    pad = torch.arange(L)[None, :] >= lengths[:, None]
    known = torch.rand(B, L, generator=g) >= shape.unknown_frac
    known[:, 0] = True
    return q, k, v, pad, known


def dense_mask(pad: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool, True = may attend; the SPEC 1.1 rule, plus self for padded queries."""
    L = pad.shape[1]
    eye = torch.eye(L, dtype=torch.bool)
    allowed = (~pad)[:, None, :] & (known[:, None, :] | eye)
    return (allowed | eye)[:, None]


def useful_flops(shape: AttnShape, pad: torch.Tensor, known: torch.Tensor) -> float:
    """Forward flops of the allowed pairs only: 2 D for q.k plus 2 D for p.v, per pair and head."""
    valid = ~pad
    nv = valid.sum(1)
    nk = (valid & known).sum(1)
    nu = (valid & ~known).sum(1)
    pairs = int((nv * nk + nu).sum())  # unknown queries also attend themselves
    return 4.0 * shape.head_dim * pairs * shape.heads


def make_call(variant: str, mode: str, q, k, v, pad, known) -> Callable[[], object]:
    """A zero-argument callable running one variant once (inputs bound, grads reset each call)."""
    from biogen.ops import masked_gene_attention

    if variant == "biogen-cpu":
        fwd = lambda q, k, v: masked_gene_attention(q, k, v, key_padding_mask=pad, known=known, backend="cpu")  # noqa
    elif variant == "sdpa-dense-mask":
        mask = dense_mask(pad, known)
        fwd = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa
    elif variant == "sdpa-no-mask":
        fwd = lambda q, k, v: F.scaled_dot_product_attention(q, k, v)  # noqa
    else:
        raise ValueError(f"unknown variant {variant!r}")

    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fwd(q, k, v)
        return call

    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)

    def call():
        for t in leaves:
            t.grad = None
        fwd(*leaves).backward(grad_out)
        return leaves[0].grad

    return call


# ------------------------------------------------------------------------------ peak memory


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_rss_child(variant: str, mode: str, shape_name: str) -> None:
    # A tiny call first pays the one-off costs (lazy imports, custom-op registration, thread pools)
    # that a training loop pays once; tiny, so the allocator keeps no large freed blocks to reuse.
    make_call(variant, mode, *make_inputs(AttnShape("warm-up", batch=2, heads=2, length=64)))()
    q, k, v, pad, known = make_inputs(SHAPES[shape_name])
    call = make_call(variant, mode, q, k, v, pad, known)
    # VmHWM, not getrusage's ru_maxrss: ru_maxrss survives fork + exec, so a child would report the
    # parent's (pytest's) high-water mark. Writing 5 to clear_refs resets VmHWM to the current RSS.
    before = _proc_status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # older kernels: the high-water mark so far is the baseline
        before = _proc_status_kib("VmHWM")
    call()
    after = _proc_status_kib("VmHWM")
    print(json.dumps({"peak_rss_delta_mib": max(0, after - before) / 1024.0}))


def peak_rss_delta_mib(variant: str, mode: str, shape_name: str) -> float:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "python"), env.get("PYTHONPATH", "")])
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import bench_masked_attention as b; b._peak_rss_child(%r, %r, %r)\n"
    ) % (HERE, variant, mode, shape_name)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_delta_mib"])


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * 2048**3 / times[len(times) // 2] / 1e9


_INPUTS: dict = {}


def _inputs(shape_name: str):
    if shape_name not in _INPUTS:
        _INPUTS.clear()  # one shape resident at a time: L = 3001 inputs and masks are large
        _INPUTS[shape_name] = make_inputs(SHAPES[shape_name])
    return _INPUTS[shape_name]


def _check_agreement(shape_name: str) -> None:
    """Before timing: the kernel and the dense-mask baseline compute the same thing on valid rows."""
    key = ("checked", shape_name)
    if key in _INPUTS:
        return
    q, k, v, pad, known = _inputs(shape_name)
    with torch.no_grad():
        ours = make_call("biogen-cpu", "fwd", q, k, v, pad, known)()
        ref = make_call("sdpa-dense-mask", "fwd", q, k, v, pad, known)()
    valid = (~pad)[:, None, :, None]
    err = float((ours - ref).abs().masked_fill(~valid, 0).max())
    if not err < 1e-4:
        raise AssertionError(f"biogen-cpu disagrees with SDPA + dense mask on {shape_name}: max error {err}")
    _INPUTS[key] = True


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_masked_attention(benchmark, matmul_gflops, shape_name, mode):
    from biogen.ops.masked_attention import OP

    if "cpu" not in OP.reasons:
        pytest.skip("biogen._C was built without the CPU masked attention kernel")
    shape = SHAPES[shape_name]
    q, k, v, pad, known = _inputs(shape_name)
    _check_agreement(shape_name)
    benchmark.group = f"masked-attention {shape_name} {mode}"
    res = compare(benchmark, {variant: make_call(variant, mode, q, k, v, pad, known) for variant in VARIANTS},
                  ours="biogen-cpu", rounds=shape.rounds)
    flops = useful_flops(shape, pad, known) * (1.0 if mode == "fwd" else 3.5)
    from biogen.ops import build_info

    info = benchmark.extra_info
    info.update(
        shape=f"B={shape.batch} H={shape.heads} L={shape.length} D={shape.head_dim} {shape.dtype}",
        unknown_frac=shape.unknown_frac,
        matmul_gflops=matmul_gflops,
        cpu_capability=build_info().get("cpu_capability"),
    )
    for variant in VARIANTS:
        info[f"{variant}_gflops_useful"] = flops / res.median(variant) / 1e9
        info[f"{variant}_peak_rss_delta_mib"] = peak_rss_delta_mib(variant, mode, shape_name)
