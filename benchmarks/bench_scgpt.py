"""scGPT-style model throughput on the generative objective: biogen's masked-attention encoder vs
torch.nn.TransformerEncoder with the equivalent dense attention mask.

scGPT's generative pretraining hides the values of a fraction of each cell's genes (``unknown``) and
lets every gene attend only to the known genes and to itself (SPEC 1.1); that mask is what
:func:`biogen.ops.masked_gene_attention` exists for. Here ``mask_ratio`` (0.4, the config default)
of each cell's genes are unknown, ``<cls>`` known, for the ``small`` and ``paper`` presets at
max_seq_len 1200 (batch 8, per-cell lengths uniform in 50-100 % of the maximum, the rest padding).
One test per preset and phase times, interleaved in the same rounds after a warm-up
(``conftest.compare``):

- ``train``: one training step of the generative objective (``model.loss(batch, "generative")``:
  forward, MSE at the unknown genes, backward, Adam);
- ``infer``: generative inference, the forward pass predicting the unknown genes' values (eval mode);

for

- ``nn``: the same architecture with ``torch.nn.TransformerEncoder`` given the SPEC 1.1 mask as a
  dense (batch x heads, L, L) boolean mask, what a user would otherwise write (reference scGPT
  without flash-attn) -- the baseline;
- ``biogen``: default backend selection of :func:`biogen.ops.masked_gene_attention`;
- ``biogen-torch``: the same model under ``biogen.ops.use_backend("torch")`` (reference backend).

Run:  PYTHONPATH=python python -m pytest benchmarks/bench_scgpt.py --benchmark-only -k small
Env:  BIOGEN_BENCH_ROUNDS (default 3), BIOGEN_BENCH_DEVICE (default cuda if available else cpu).
extra_info: cells/s of each side, the ratios with range and IQR over the rounds, the unknown
fraction, and the peak memory of one step of each side (in-process, after the warm-up).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch import nn

import biogen.ops
from bench_masked_attention import dense_mask
from biogen.models.scgpt.network import ScGPTConfig, ScGPTModel
from conftest import compare

BATCH, MAX_LEN, N_TOKENS = 8, 1200, 30000
DEVICE = torch.device(os.environ.get("BIOGEN_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
ROUNDS = int(os.environ.get("BIOGEN_BENCH_ROUNDS", "3"))
IMPLS = ("nn", "biogen", "biogen-torch")


class _TorchEncoder(nn.Module):
    """torch.nn.TransformerEncoder with biogen's encoder signature and the SPEC 1.1 mask made dense."""

    def __init__(self, c: ScGPTConfig):
        super().__init__()
        self.nhead = c.nhead
        layer = nn.TransformerEncoderLayer(c.d_model, c.nhead, c.d_hid, c.dropout, batch_first=True,
                                           norm_first=c.pre_norm)
        self.enc = nn.TransformerEncoder(layer, c.nlayers, enable_nested_tensor=False)

    def forward(self, x, key_padding_mask=None, known=None):
        B, L = x.shape[:2]
        pad = key_padding_mask if key_padding_mask is not None else torch.zeros(B, L, dtype=torch.bool,
                                                                                device=x.device)
        kn = known if known is not None else torch.ones_like(pad)
        blocked = ~dense_mask(pad.cpu(), kn.cpu()).to(x.device)  # True = may not attend
        return self.enc(x, mask=blocked.expand(B, self.nhead, L, L).reshape(B * self.nhead, L, L))


def _batch(c: ScGPTConfig):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(MAX_LEN // 2, MAX_LEN + 1, (BATCH,), generator=g)
    pos = torch.arange(MAX_LEN)
    pad = pos[None, :] >= lengths[:, None]
    ids = torch.randint(3, N_TOKENS, (BATCH, MAX_LEN), generator=g)
    ids[:, 0] = 1
    ids[pad] = 0
    vals = torch.randint(0, c.n_bins, (BATCH, MAX_LEN), generator=g).float().masked_fill(pad, c.pad_value)
    known = torch.rand(BATCH, MAX_LEN, generator=g) >= c.mask_ratio
    known[:, 0] = True  # <cls>
    b = dict(gene_ids=ids, values=vals, target_values=vals.clamp_min(0), padding_mask=pad, known=known,
             mlm_mask=~known & ~pad)
    return {k: v.to(DEVICE) for k, v in b.items()}


def _side(impl: str, preset: str, phase: str):
    torch.manual_seed(0)
    c = ScGPTConfig.preset(preset, max_seq_len=MAX_LEN)
    model = ScGPTModel(c, N_TOKENS, 0).to(DEVICE)
    if impl == "nn":
        model.transformer_encoder = _TorchEncoder(c).to(DEVICE)

    def ctx():  # a fresh context each call: use_backend is a one-shot generator context manager
        return biogen.ops.use_backend("torch") if impl == "biogen-torch" else contextlib.nullcontext()

    batch = _batch(c)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train_step():
        with ctx():
            opt.zero_grad(set_to_none=True)
            model.loss(batch, "generative")["loss"].backward()
            opt.step()

    def infer_step():
        with ctx(), torch.no_grad():
            model(batch["gene_ids"], batch["values"], batch["padding_mask"], batch["known"], heads=("expr",))

    model.train(phase == "train")
    return (train_step if phase == "train" else infer_step), batch


@pytest.mark.parametrize("phase", ["train", "infer"])
@pytest.mark.parametrize("preset", ["small", "paper"])
def test_scgpt_generative(benchmark, preset, phase):
    sides, batch = {}, None
    for impl in IMPLS:
        sides[impl], batch = _side(impl, preset, phase)
    benchmark.group = f"scGPT {preset} generative {phase}"
    res = compare(benchmark, sides, ours="biogen", rounds=ROUNDS, memory=True, device=DEVICE)
    valid = ~batch["padding_mask"]
    info = benchmark.extra_info
    info.update(preset=preset, phase=phase, device=str(DEVICE), batch=BATCH, max_seq_len=MAX_LEN,
                mean_len=float(valid.sum(1).float().mean()),
                unknown_frac=float((~batch["known"] & valid).sum() / valid.sum()))
    for impl in IMPLS:
        info[f"{impl}_cells_per_s"] = BATCH / res.median(impl)
