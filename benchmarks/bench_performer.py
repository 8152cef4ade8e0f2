"""Performer FAVOR+ attention at the scBERT shape: biogen's fused kernel vs performer-pytorch.

Shape from scBERT (SPEC 1.2): heads 10, length 16,907 genes (16,906 + <cls>), head_dim 64,
m = int(64 ln 64) = 266 random features, float32, batch 1 and 4. One run measures, forward and
forward + backward (gradients for q, k, v):

- ``performer-pytorch``: ``FastAttention`` (the baseline; skipped with a reason if not installed);
- ``biogen``: :func:`biogen.ops.performer_attention` on the default backend (C++ on a CPU);
- ``biogen-torch``: the same op on the pure-PyTorch reference backend.

``extra_info`` holds the speed-up over the baseline and the peak extra memory of the call (on a
GPU from ``torch.cuda.max_memory_allocated``; on a CPU the peak resident set size, sampled every
millisecond, above the resident size before the call) and its ratio to the baseline's.

Run:  PYTHONPATH=python python -m pytest benchmarks/bench_performer.py --benchmark-only
Env:  BIOGEN_BENCH_ROUNDS (default 2), BIOGEN_BENCH_BATCHES (default "1,4"),
      BIOGEN_BENCH_IMPLS (default all three, comma-separated; the reference backend at batch 4
      forward+backward materialises several 0.7 GB feature tensors and takes minutes on 2 cores),
      BIOGEN_BENCH_DEVICE (default cuda if available else cpu).
"""

from __future__ import annotations

import math
import os
import threading
import warnings

import pytest
import torch

from biogen.ops import gaussian_orthogonal_random_matrix, performer_attention

HEADS, LENGTH, HEAD_DIM = 10, 16907, 64
NB_FEATURES = int(HEAD_DIM * math.log(HEAD_DIM))
BATCHES = [int(b) for b in os.environ.get("BIOGEN_BENCH_BATCHES", "1,4").split(",")]
ROUNDS = int(os.environ.get("BIOGEN_BENCH_ROUNDS", "2"))
DEVICE = torch.device(os.environ.get("BIOGEN_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
IMPLS = ("performer-pytorch", "biogen", "biogen-torch")  # baseline first: the others report ratios
IMPLS_RUN = os.environ.get("BIOGEN_BENCH_IMPLS", ",".join(IMPLS)).split(",")
_BASELINE: dict = {}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakMemory:
    """Peak extra memory of the block: CUDA allocator statistics, or sampled RSS on the CPU."""

    def __enter__(self):
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = _rss()
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, _rss())
            self.extra = self.peak - self.base


def _baseline_module(projection):
    try:
        from performer_pytorch import FastAttention
    except ImportError as exc:
        pytest.skip(f"performer-pytorch is not importable ({exc}); pip install performer-pytorch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fa = FastAttention(HEAD_DIM, nb_features=NB_FEATURES)
    fa.projection_matrix.copy_(projection)
    return fa.to(DEVICE)


def _make_fn(impl, batch, backward):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, HEADS, LENGTH, HEAD_DIM, generator=g).to(DEVICE) for _ in range(3))
    w = gaussian_orthogonal_random_matrix(NB_FEATURES, HEAD_DIM, generator=g, device=DEVICE)
    if backward:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    if impl == "performer-pytorch":
        fa = _baseline_module(w)
        attn = lambda: fa(q, k, v)  # noqa: E731
    else:
        backend = "torch" if impl == "biogen-torch" else None
        attn = lambda: performer_attention(q, k, v, w, backend=backend)  # noqa: E731

    def run():
        if backward:
            out = attn()
            out.backward(torch.ones_like(out))
            for t in (q, k, v):
                t.grad = None
        else:
            with torch.no_grad():
                attn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
def test_performer_scbert_shape(benchmark, impl, batch, pass_):
    if impl not in IMPLS_RUN:
        pytest.skip(f"{impl} not in BIOGEN_BENCH_IMPLS")
    run = _make_fn(impl, batch, pass_ == "forward+backward")
    run()  # warm-up: first-call costs (allocator arenas, thread pools, lazy imports) are not the op's
    with _PeakMemory() as mem:
        run()
    benchmark.group = f"performer B={batch} H={HEADS} L={LENGTH} D={HEAD_DIM} m={NB_FEATURES} {pass_}"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    mean = benchmark.stats.stats.mean
    info = benchmark.extra_info
    info.update(impl=impl, batch=batch, peak_extra_mib=round(mem.extra / 2**20, 1), device=str(DEVICE),
                threads=torch.get_num_threads())
    key = (batch, pass_)
    if impl == IMPLS[0]:
        _BASELINE[key] = (mean, mem.extra)
    elif key in _BASELINE:
        base_t, base_mem = _BASELINE[key]
        info["speedup_vs_performer_pytorch"] = round(base_t / mean, 2)
        info["peak_memory_fraction_of_performer_pytorch"] = round(mem.extra / max(base_mem, 1), 3)
