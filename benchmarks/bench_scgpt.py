"""scGPT-style model throughput: biogen's masked-attention encoder vs torch.nn.TransformerEncoder.

For the ``small`` and ``paper`` presets at max_seq_len 1200 (batch 8, per-cell lengths uniform in
50-100 % of the maximum, the rest padding), one run measures cells/s of a training step (masked
value objective, forward + backward + Adam) and of inference (cell embeddings, eval mode) for

- ``biogen``: default backend selection of :func:`biogen.ops.masked_gene_attention`;
- ``biogen-torch``: the same model under ``biogen.ops.use_backend("torch")`` (reference backend);
- ``nn``: the same architecture with ``torch.nn.TransformerEncoder`` (what reference scGPT runs
  when flash-attn is absent) -- the baseline; ratios are against it, measured in the same run.

Run:  PYTHONPATH=python python -m pytest benchmarks/bench_scgpt.py --benchmark-only -k small
Env:  BIOGEN_BENCH_ROUNDS (default 3), BIOGEN_BENCH_DEVICE (default cuda if available else cpu).
"""

from __future__ import annotations

import contextlib
import os
import resource

import pytest
import torch
from torch import nn

import biogen.ops
from biogen.models.scgpt.network import ScGPTConfig, ScGPTModel

BATCH, MAX_LEN, N_TOKENS = 8, 1200, 30000
DEVICE = torch.device(os.environ.get("BIOGEN_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
ROUNDS = int(os.environ.get("BIOGEN_BENCH_ROUNDS", "3"))
IMPLS = ("nn", "biogen", "biogen-torch")  # baseline first so the others can report a ratio
_BASELINE: dict = {}


class _TorchEncoder(nn.Module):
    """torch.nn.TransformerEncoder with biogen's encoder signature (every token known)."""

    def __init__(self, c: ScGPTConfig):
        super().__init__()
        layer = nn.TransformerEncoderLayer(c.d_model, c.nhead, c.d_hid, c.dropout, batch_first=True,
                                           norm_first=c.pre_norm)
        self.enc = nn.TransformerEncoder(layer, c.nlayers, enable_nested_tensor=False)

    def forward(self, x, key_padding_mask=None, known=None):
        return self.enc(x, src_key_padding_mask=key_padding_mask)


def _batch(c: ScGPTConfig):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(MAX_LEN // 2, MAX_LEN + 1, (BATCH,), generator=g)
    pos = torch.arange(MAX_LEN)
    pad = pos[None, :] >= lengths[:, None]
    ids = torch.randint(3, N_TOKENS, (BATCH, MAX_LEN), generator=g)
    ids[:, 0] = 1
    ids[pad] = 0
    vals = torch.randint(0, c.n_bins, (BATCH, MAX_LEN), generator=g).float().masked_fill(pad, c.pad_value)
    mlm = (torch.rand(BATCH, MAX_LEN, generator=g) < c.mask_ratio) & ~pad
    mlm[:, 0] = False
    b = dict(gene_ids=ids, values=vals, target_values=vals.clamp_min(0), padding_mask=pad, mlm_mask=mlm,
             known=torch.ones_like(pad))
    return {k: v.to(DEVICE) for k, v in b.items()}


def _peak_mb() -> float:
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process-wide peak RSS


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in /proc/self/status")


def _reset_rss_peak():
    """Reset the kernel's resident high-water mark (Linux: writing 5 to clear_refs sets VmHWM to the
    current RSS) and return the current RSS in MB, so each variant's peak is its own; None elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")
    except OSError:
        return None


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("phase", ["train", "infer"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("preset", ["small", "paper"])
def test_scgpt_throughput(benchmark, preset, impl, phase):
    torch.manual_seed(0)
    c = ScGPTConfig.preset(preset, max_seq_len=MAX_LEN)
    model = ScGPTModel(c, N_TOKENS, 0).to(DEVICE)
    if impl == "nn":
        model.transformer_encoder = _TorchEncoder(c).to(DEVICE)
    def ctx():  # a fresh context each call: use_backend is a one-shot generator context manager
        return biogen.ops.use_backend("torch") if impl == "biogen-torch" else contextlib.nullcontext()

    batch = _batch(c)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    peak_before = _peak_mb()
    rss_mark = _reset_rss_peak() if DEVICE.type == "cpu" else None

    def train_step():
        with ctx():
            opt.zero_grad(set_to_none=True)
            model.loss(batch, "mlm")["loss"].backward()
            opt.step()
        _sync()

    def infer_step():
        with ctx(), torch.no_grad():
            model(batch["gene_ids"], batch["values"], batch["padding_mask"], heads=())
        _sync()

    if phase == "train":
        model.train()
        fn = train_step
    else:
        model.eval()
        fn = infer_step
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    mean = benchmark.stats.stats.mean
    key = (preset, phase)
    if impl == "nn":
        _BASELINE[key] = mean
    info = benchmark.extra_info
    info.update(preset=preset, impl=impl, phase=phase, device=str(DEVICE), batch=BATCH, max_seq_len=MAX_LEN,
                mean_len=float((~batch["padding_mask"]).sum(1).float().mean()),
                cells_per_s=BATCH / mean, peak_mem_mb=_peak_mb(),
                peak_mem_kind="cuda max_memory_allocated" if DEVICE.type == "cuda" else "process peak RSS")
    if rss_mark is not None:
        # this variant's peak above what was resident before its step ran (model and batch
        # included). malloc keeps memory freed by earlier tests and reuses it without growing RSS,
        # so exact per-variant peaks need one variant per process: -k "small-biogen-train" etc.
        info["peak_mem_kind"] = "peak RSS increase during this variant (VmHWM after clear_refs)"
        info["peak_rss_increase_mb"] = _status_mb("VmHWM") - rss_mark
    elif DEVICE.type == "cpu":
        # ru_maxrss only rises within a process: 0 when an earlier test already reached more;
        # run one impl per process (-k) for exact peaks.
        info["peak_rss_increase_mb"] = _peak_mb() - peak_before
    if key in _BASELINE and impl != "nn":
        info["speedup_vs_nn"] = _BASELINE[key] / mean
