"""Oversubscription: how much biogen's CPU kernels slow down when another process competes for the
cores, against how much torch's own matmul slows down in the same conditions.

Each case is timed on a quiet CPU and beside ``BIOGEN_BENCH_COMPETITORS`` busy-loop processes
(default: one per core torch uses), in rounds that alternate the two conditions and, inside each
condition, the biogen case and the torch baseline, so both see the same machine state. A round
repeats its call until it lasts at least ``BIOGEN_BENCH_MIN_ROUND`` seconds (default 0.05) after a
warm-up. Per side the slowdown is median(loaded) / median(quiet); ``extra_info`` holds both
slowdowns, their ratio (biogen / torch matmul: <= 1 means biogen degrades no worse) with its range
over the rounds (each round's own loaded/quiet ratios), and the process's peak RSS.

Cases, at the sizes of ``biogen demo`` (``small`` recipes on pbmc68k_reduced: 16 cells a batch,
scGPT 512 genes a cell, scBERT 765 genes + 1), float32, forward + backward:

- ``masked_attention``: :func:`biogen.ops.masked_gene_attention`, (16, 4, 512, 16), cell lengths
  uniform in 50-100 %, generative known mask;
- ``performer``: :func:`biogen.ops.performer_attention`, (16, 2, 766, 16), 32 random features;
- ``scgpt_step`` / ``scbert_step``: a whole training step (forward, backward, Adam) of the
  ``small`` models, biogen's kernels inside torch's layers;
- baseline ``torch_matmul``: ``torch.mm`` of (16 * 512, 64) by (64, 128), the scGPT feed-forward
  layer's product.

Run:  PYTHONPATH=python python -m pytest benchmarks/bench_contention.py --benchmark-only
Env:  BIOGEN_BENCH_ROUNDS (default 5), BIOGEN_BENCH_COMPETITORS, BIOGEN_BENCH_MIN_ROUND.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import subprocess
import sys
import time

import pytest
import torch

from biogen.models.scbert import ScBERTConfig, ScBERTModel
from biogen.models.scgpt import ScGPTConfig, ScGPTModel
from biogen.ops import gaussian_orthogonal_random_matrix, masked_gene_attention, performer_attention

ROUNDS = int(os.environ.get("BIOGEN_BENCH_ROUNDS", "5"))
COMPETITORS = int(os.environ.get("BIOGEN_BENCH_COMPETITORS", str(torch.get_num_threads())))
MIN_ROUND = float(os.environ.get("BIOGEN_BENCH_MIN_ROUND", "0.05"))
B, L_GPT, L_BERT = 16, 512, 766


@contextlib.contextmanager
def competitors(n: int):
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.1)  # let them reach the run queue
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _masked_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, 4, L_GPT, 16, generator=g).requires_grad_(True) for _ in range(3))
    pad = torch.arange(L_GPT)[None] >= torch.randint(L_GPT // 2, L_GPT + 1, (B,), generator=g)[:, None]
    known = torch.rand(B, L_GPT, generator=g) < 0.5
    known[:, 0] = True

    def step():
        out = masked_gene_attention(q, k, v, key_padding_mask=pad, known=known)
        torch.autograd.grad(out.sum(), (q, k, v))
    return step


def _performer():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, 2, L_BERT, 16, generator=g).requires_grad_(True) for _ in range(3))
    w = gaussian_orthogonal_random_matrix(32, 16, generator=g)

    def step():
        out = performer_attention(q, k, v, w)
        torch.autograd.grad(out.sum(), (q, k, v))
    return step


def _scgpt_step():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    cfg = ScGPTConfig.preset("tiny", max_seq_len=L_GPT, d_model=64, nhead=4, nlayers=2, d_hid=128, dropout=0.1)
    model = ScGPTModel(cfg, 800, 0, n_classes=10)
    pad = torch.arange(L_GPT)[None] >= torch.randint(L_GPT // 2, L_GPT + 1, (B,), generator=g)[:, None]
    ids = torch.randint(3, 800, (B, L_GPT), generator=g).masked_fill(pad, 0)
    ids[:, 0] = 1
    batch = dict(gene_ids=ids, values=torch.randint(0, cfg.n_bins, (B, L_GPT), generator=g).float(),
                 padding_mask=pad, labels=torch.randint(0, 10, (B,), generator=g))
    opt = torch.optim.Adam(model.parameters(), 1e-4)

    def step():
        opt.zero_grad()
        model.loss(batch, "classify")["loss"].backward()
        opt.step()
    return step


def _scbert_step():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ScBERTModel(ScBERTConfig.preset("small"), L_BERT - 1, n_classes=10)
    tokens = torch.randint(0, 6, (B, L_BERT), generator=g)
    labels = torch.randint(0, 10, (B,), generator=g)
    opt = torch.optim.Adam(model.parameters(), 1e-4)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(tokens).logits, labels).backward()
        opt.step()
    return step


def _torch_matmul():
    a, w = torch.randn(B * L_GPT, 64), torch.randn(64, 128)
    return lambda: torch.mm(a, w)


CASES = {"masked_attention": _masked_attention, "performer": _performer, "scgpt_step": _scgpt_step,
         "scbert_step": _scbert_step}


def _calibrate(fn) -> int:
    fn()  # warm-up
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t
        if dt >= MIN_ROUND:
            return n
        n = max(n * 2, int(n * MIN_ROUND / max(dt, 1e-6)) + 1)


def _time(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


@pytest.mark.parametrize("case", list(CASES))
def test_contention(benchmark, case):
    sides = {"biogen": CASES[case](), "torch_matmul": _torch_matmul()}
    reps = {name: _calibrate(fn) for name, fn in sides.items()}
    times = {(name, cond): [] for name in sides for cond in ("quiet", "loaded")}
    for _ in range(ROUNDS):
        for cond in ("quiet", "loaded"):
            with competitors(COMPETITORS if cond == "loaded" else 0):
                for name, fn in sides.items():
                    times[(name, cond)].append(_time(fn, reps[name]))
    slow = {name: statistics.median(times[(name, "loaded")]) / statistics.median(times[(name, "quiet")])
            for name in sides}
    per_round = [(times[("biogen", "loaded")][i] / times[("biogen", "quiet")][i])
                 / (times[("torch_matmul", "loaded")][i] / times[("torch_matmul", "quiet")][i]) for i in range(ROUNDS)]
    benchmark.extra_info.update({
        "threads": torch.get_num_threads(), "competitors": COMPETITORS, "rounds": ROUNDS,
        "quiet_ms": 1e3 * statistics.median(times[("biogen", "quiet")]),
        "loaded_ms": 1e3 * statistics.median(times[("biogen", "loaded")]),
        "slowdown": slow["biogen"], "torch_matmul_slowdown": slow["torch_matmul"],
        "slowdown_vs_torch_matmul": slow["biogen"] / slow["torch_matmul"],
        "slowdown_vs_torch_matmul_min": min(per_round), "slowdown_vs_torch_matmul_max": max(per_round),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })
    # pytest-benchmark's own table: one loaded round of the biogen side.
    with competitors(COMPETITORS):
        benchmark.pedantic(sides["biogen"], rounds=1, iterations=reps["biogen"], warmup_rounds=0)
