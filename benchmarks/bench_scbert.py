"""scBERT `paper` model at the original length: training and inference throughput, peak memory.

Configuration from :meth:`ScBERTConfig.preset("paper")` (dim 200, depth 6, heads 10, dim_head 64,
ff_mult 4, 266 random features, 7 tokens) on 16,906 genes + 1 = 16,907 positions, float32. One run
measures, per batch size:

- ``performer-pytorch``: performer-pytorch's ``PerformerLM`` of the same configuration (no rotary
  embedding, learned absolute position = gene embedding, output bias as scBERT) — the baseline,
  skipped with a reason if not installed;
- ``biogen``: :class:`biogen.models.scbert.ScBERTModel` on the default kernel backend (C++ on CPU);
- ``biogen-checkpointed``: the same with ``gradient_checkpointing=True`` (layers recomputed in the
  backward pass: less memory, more compute);
- ``biogen-torch``: the same model under ``biogen.ops.use_backend("torch")`` (pure PyTorch ops);
- ``performer-pytorch-bf16`` and ``biogen-bf16``: the baseline and biogen under mixed precision,
  ``torch.autocast(device, bfloat16)`` on a CPU (float16 on CUDA), as ``ScBERT.fit(...,
  mixed_precision=True)``: matmuls in bf16, layer norms / softmax / cross-entropy in float32,
  float32 parameters and gradients. On a CPU with AVX512-BF16 (or AMX) oneDNN's bf16 matmuls are
  about twice as fast as float32 ones (MKL's float32 ones on an AMD CPU, 3-4x), and the Performer
  kernel takes its products as bf16 dot products with float32 sums (``avx512_bf16`` level).
  ``biogen-bf16`` reports its ratios against both baselines: float32 and the same autocast.

``train``: forward to the token logits of every position, cross-entropy against random tokens, and
backward (the same work for every implementation; no optimizer step). ``inference``: forward under
``torch.no_grad``. ``extra_info``: cells/s, speed-up over the float32 baseline, peak extra memory
of one step after a warm-up step (CUDA allocator peak, or sampled RSS above the pre-call RSS on a
CPU, measured in a child process where glibc unmaps freed blocks at once so that RSS follows the
live tensors, see ``_exact_rss``) and its fraction of the baseline's; ``biogen-bf16`` adds the same two
against the autocast baseline.

Run:  PYTHONPATH=python python -m pytest benchmarks/bench_scbert.py --benchmark-only
Env:  BIOGEN_BENCH_ROUNDS (default 1), BIOGEN_BENCH_SCBERT_BATCHES (default "1"),
      BIOGEN_BENCH_SCBERT_IMPLS (comma-separated subset of the variants; default all),
      BIOGEN_BENCH_SCBERT_GENES (default 16906),
      BIOGEN_BENCH_DEVICE (default cuda if available else cpu).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import subprocess
import sys
import warnings
from dataclasses import replace

import pytest
import torch

from bench_performer import _PeakMemory  # same sampler as the kernel benchmark
from biogen.models.scbert.network import ScBERTConfig, ScBERTModel
from biogen.ops import use_backend

CFG = ScBERTConfig.preset("paper")
N_GENES = int(os.environ.get("BIOGEN_BENCH_SCBERT_GENES", "16906"))  # smaller for a quick smoke run
LENGTH = N_GENES + 1
BATCHES = [int(b) for b in os.environ.get("BIOGEN_BENCH_SCBERT_BATCHES", "1").split(",")]
ROUNDS = int(os.environ.get("BIOGEN_BENCH_ROUNDS", "1"))
DEVICE = torch.device(os.environ.get("BIOGEN_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
# baselines first: the others report ratios against them
ALL_IMPLS = ("performer-pytorch", "performer-pytorch-bf16", "biogen", "biogen-bf16", "biogen-checkpointed",
             "biogen-torch")
IMPLS = tuple(i for i in ALL_IMPLS if i in os.environ.get("BIOGEN_BENCH_SCBERT_IMPLS", ",".join(ALL_IMPLS)).split(","))
BASELINES = {"performer-pytorch": "performer_pytorch", "performer-pytorch-bf16": "performer_pytorch_bf16"}
_BASELINE: dict = {}


def _autocast(impl):
    """Mixed precision as ``ScBERT._autocast``: bfloat16 on a CPU, float16 on CUDA."""
    if not impl.endswith("-bf16"):
        return contextlib.nullcontext()
    return torch.autocast(DEVICE.type, dtype=torch.float16 if DEVICE.type == "cuda" else torch.bfloat16)


def _exact_rss():
    """Make glibc return every freed block of 64 KiB or more to the OS at once (fixed mmap and trim
    thresholds; by default glibc keeps blocks below 32 MiB in a heap it reuses), so that the sampled
    RSS follows the live tensors. Used only in the child process that measures a CPU peak: the page
    faults it costs on every allocation would slow the timed steps (biogen-bf16 ~1.45x)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD


def _peak_extra(impl, batch, train) -> int:
    """Peak extra memory (bytes) of one step after a warm-up step. CPU: measured in a fresh child
    process with :func:`_exact_rss`, so it depends neither on earlier cases nor on glibc's heap."""
    if DEVICE.type != "cpu":
        run = _make_fn(impl, batch, train)
        run()
        with _PeakMemory() as mem:
            run()
        return mem.extra
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), impl, str(batch), str(int(train))], env=env,
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def _release_freed_memory():
    """Return memory freed by earlier cases to the OS, so the RSS-based peak of this case starts clean
    (otherwise a later case reuses pages an earlier one left mapped and looks smaller)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _baseline_model():
    try:
        from performer_pytorch import PerformerLM
    except ImportError as exc:
        pytest.skip(f"performer-pytorch is not importable ({exc}); pip install performer-pytorch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PerformerLM(num_tokens=CFG.n_tokens, max_seq_len=LENGTH, dim=CFG.dim, depth=CFG.depth,
                           heads=CFG.heads, dim_head=CFG.dim_head, ff_mult=CFG.ff_mult, nb_features=CFG.n_features,
                           rotary_position_emb=False, axial_position_emb=False, attn_out_bias=True, qkv_bias=False)


def _make_fn(impl, batch, train):
    torch.manual_seed(0)
    if impl.startswith("performer-pytorch"):
        model = _baseline_model().to(DEVICE)
        logits = model
    else:
        cfg = replace(CFG, gradient_checkpointing=impl == "biogen-checkpointed")
        model = ScBERTModel(cfg, N_GENES).to(DEVICE)
        logits = lambda x: model.mlm_head(model.encode(x))  # noqa: E731
    backend = (lambda: use_backend("torch")) if impl == "biogen-torch" else contextlib.nullcontext
    x = torch.randint(0, CFG.n_tokens, (batch, LENGTH), device=DEVICE)
    target = torch.randint(0, CFG.n_tokens - 1, (batch, LENGTH), device=DEVICE)
    model.train(train)

    def run():
        with backend():
            if train:
                with _autocast(impl):
                    out = logits(x)
                    loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
                loss.backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad(), _autocast(impl):
                    logits(x)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("mode", ["inference", "train"])
def test_scbert_paper(benchmark, impl, batch, mode):
    peak = _peak_extra(impl, batch, mode == "train")
    _release_freed_memory()
    run = _make_fn(impl, batch, mode == "train")
    run()  # warm-up: one-time allocations (kernel caches, lazily created state) are not a step's
    benchmark.group = f"scBERT paper B={batch} L={LENGTH} {mode}"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    mean = benchmark.stats.stats.mean
    info = benchmark.extra_info
    info.update(impl=impl, batch=batch, cells_per_s=round(batch / mean, 4), peak_extra_mib=round(peak / 2**20, 1),
                device=str(DEVICE), threads=torch.get_num_threads())
    if impl in BASELINES:
        _BASELINE[(impl, batch, mode)] = (mean, peak)
        if impl == "performer-pytorch":
            return
    # every variant against the float32 baseline; the mixed-precision ones also against the same autocast
    for base in ("performer-pytorch",) + (("performer-pytorch-bf16",) if impl == "biogen-bf16" else ()):
        if (base, batch, mode) in _BASELINE:
            base_t, base_mem = _BASELINE[(base, batch, mode)]
            info[f"speedup_vs_{BASELINES[base]}"] = round(base_t / mean, 2)
            info[f"peak_memory_fraction_of_{BASELINES[base]}"] = round(peak / max(base_mem, 1), 3)


if __name__ == "__main__":  # child of _peak_extra: python bench_scbert.py IMPL BATCH TRAIN -> peak bytes
    _exact_rss()
    _run = _make_fn(sys.argv[1], int(sys.argv[2]), bool(int(sys.argv[3])))
    _run()
    _release_freed_memory()
    with _PeakMemory() as _mem:
        _run()
    print(_mem.extra)
