"""Performer FAVOR+ attention at the scBERT shape: biogen's fused kernel vs performer-pytorch.

Shape from scBERT (SPEC 1.2): heads 10, length 16,907 genes (16,906 + <cls>), head_dim 64,
m = int(64 ln 64) = 266 random features, float32, batch 1 and 4. One run measures, forward and
forward + backward (gradients for q, k, v):

The causal case (``test_performer_causal``) uses batch 1, heads 10, head_dim 64, m = 266 and a
length of 4,096 (``BIOGEN_BENCH_CAUSAL_LENGTH``): performer-pytorch without its CUDA extension runs
``causal_linear_attention_noncuda``, whose per-chunk (tokens, m, head_dim) context cumsums autograd
keeps for the backward (several GB at this length), so scBERT's 16,907 would not fit in memory.

- ``performer-pytorch``: ``FastAttention`` (the baseline; skipped with a reason if not installed);
- ``biogen``: :func:`biogen.ops.performer_attention` on the default backend (C++ on a CPU);
- ``biogen-torch``: the same op on the pure-PyTorch reference backend.

``extra_info`` holds the speed-up of ``biogen`` over the other two (ratio of medians, with its range
and IQR over the rounds) and each one's peak extra memory of one call (on a GPU from
``torch.cuda.max_memory_allocated``; on a CPU the peak resident set size, sampled every
millisecond, above the resident size before the call), and biogen's fraction of the baseline's.

Run:  PYTHONPATH=python python -m pytest benchmarks/bench_performer.py --benchmark-only
Env:  BIOGEN_BENCH_ROUNDS (default 3), BIOGEN_BENCH_BATCHES (default "1,4"),
      BIOGEN_BENCH_IMPLS (default all three, comma-separated; the reference backend at batch 4
      forward+backward materialises several 0.7 GB feature tensors and takes minutes on 2 cores),
      BIOGEN_BENCH_DEVICE (default cuda if available else cpu),
      BIOGEN_BENCH_CAUSAL_LENGTH (default 4096).
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
import warnings

import pytest
import torch

from biogen.ops import gaussian_orthogonal_random_matrix, performer_attention
from conftest import compare

HEADS, LENGTH, HEAD_DIM = 10, 16907, 64
NB_FEATURES = int(HEAD_DIM * math.log(HEAD_DIM))
BATCHES = [int(b) for b in os.environ.get("BIOGEN_BENCH_BATCHES", "1,4").split(",")]
CAUSAL_LENGTH = int(os.environ.get("BIOGEN_BENCH_CAUSAL_LENGTH", "4096"))
ROUNDS = int(os.environ.get("BIOGEN_BENCH_ROUNDS", "3"))
DEVICE = torch.device(os.environ.get("BIOGEN_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
IMPLS = ("performer-pytorch", "biogen", "biogen-torch")  # baseline first: the others report ratios
IMPLS_RUN = os.environ.get("BIOGEN_BENCH_IMPLS", ",".join(IMPLS)).split(",")


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc): after the warm-up call glibc's raised mmap
    threshold keeps blocks up to 32 MB on the heap, and a measured call reusing them would show no
    RSS growth at all."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
            _malloc_trim()
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


def _baseline_module(projection, causal=False):
    try:
        from performer_pytorch import FastAttention
    except ImportError as exc:
        pytest.skip(f"performer-pytorch is not importable ({exc}); pip install performer-pytorch")
    if projection is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # causal without fast_transformers' CUDA extension: causal_linear_attention_noncuda
        fa = FastAttention(HEAD_DIM, nb_features=NB_FEATURES, causal=causal)
    fa.projection_matrix.copy_(projection)
    return fa.to(DEVICE)


def _make_fn(impl, batch, backward, length=LENGTH, causal=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, HEADS, length, HEAD_DIM, generator=g).to(DEVICE) for _ in range(3))
    w = gaussian_orthogonal_random_matrix(NB_FEATURES, HEAD_DIM, generator=g, device=DEVICE)
    if backward:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    if impl == "performer-pytorch":
        fa = _baseline_module(w, causal)
        attn = lambda: fa(q, k, v)  # noqa: E731
    else:
        backend = "torch" if impl == "biogen-torch" else None
        attn = lambda: performer_attention(q, k, v, w, causal=causal, backend=backend)  # noqa: E731

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


def _measure(benchmark, runs: dict, group, **info):
    """Every implementation interleaved in the same rounds (conftest.compare); the peak extra memory
    of one call each, after the warm-up."""
    benchmark.group = group
    peaks = {}
    for impl, run in runs.items():
        run()  # warm-up: first-call costs (allocator arenas, thread pools, lazy imports) are not the op's
        with _PeakMemory() as mem:
            run()
        peaks[impl] = mem.extra
    res = compare(benchmark, runs, ours="biogen", rounds=ROUNDS)
    extra = benchmark.extra_info
    extra.update(device=str(DEVICE), **info)
    for impl, peak in peaks.items():
        extra[f"{impl}_peak_extra_mib"] = round(peak / 2**20, 1)
    if IMPLS[0] in runs:
        extra["peak_memory_fraction_of_performer_pytorch"] = round(peaks["biogen"] / max(peaks[IMPLS[0]], 1), 3)
    return res


def _runs(batch, backward, **kw):
    if "biogen" not in IMPLS_RUN:
        pytest.skip("BIOGEN_BENCH_IMPLS leaves out biogen, the side every ratio is of")
    if IMPLS[0] in IMPLS_RUN:
        _baseline_module(None)  # skips with the reason when performer-pytorch is not importable
    return {impl: _make_fn(impl, batch, backward, **kw) for impl in IMPLS if impl in IMPLS_RUN}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
def test_performer_scbert_shape(benchmark, batch, pass_):
    runs = _runs(batch, pass_ == "forward+backward")
    group = f"performer B={batch} H={HEADS} L={LENGTH} D={HEAD_DIM} m={NB_FEATURES} {pass_}"
    _measure(benchmark, runs, group, batch=batch)


@pytest.mark.parametrize("pass_", ["forward", "forward+backward"])
def test_performer_causal(benchmark, pass_):
    runs = _runs(1, pass_ == "forward+backward", length=CAUSAL_LENGTH, causal=True)
    group = f"performer causal B=1 H={HEADS} L={CAUSAL_LENGTH} D={HEAD_DIM} m={NB_FEATURES} {pass_}"
    _measure(benchmark, runs, group, batch=1, causal=True, length=CAUSAL_LENGTH)
