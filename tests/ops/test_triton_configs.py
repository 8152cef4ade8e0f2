"""The Triton kernels with the tile shapes a GPU plan picks (not only the interpreter's 16 x 16):
rectangular tiles, several feature blocks, the fallbacks. Run under the interpreter at small shapes
against the float64 reference, forward and gradients."""

from __future__ import annotations

import pytest
import torch

from biogen.ops import masked_gene_attention
from biogen.ops.masked_attention import OP as MASKED
from biogen.ops.performer import OP as PERFORMER

from .helpers import max_err, require
from .test_masked_attention import make_inputs as masked_inputs, truth as masked_truth
from .test_performer import _check_fwd_bwd, make_inputs as performer_inputs


def _config():
    pytest.importorskip("triton")
    from biogen.ops.triton._common import Config

    return Config


@pytest.mark.parametrize("bm,bn", [(32, 16), (16, 32)])
def test_masked_attention_rectangular_tiles(monkeypatch, bm, bn):
    dev = require(MASKED, "triton", dtype=torch.float32, head_dim=40)
    from biogen.ops.triton import masked_attention as tm

    cfg = _config().of(1, 1, BM=bm, BN=bn)
    monkeypatch.setattr(tm, "_configs", lambda kernel, *a: [cfg])
    tm._CHOSEN.clear()
    q, k, v, pad, known = masked_inputs(2, 2, 45, 40, device=dev)
    args = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = masked_gene_attention(*args, key_padding_mask=pad, known=known, backend="triton")
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, args, gout)
    ref_args = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    from biogen.ops.reference import masked_gene_attention_ref

    ref, _ = masked_gene_attention_ref(*ref_args, pad, known)
    ref_grads = torch.autograd.grad(ref, ref_args, gout.double())
    assert max_err(out, masked_truth(q, k, v, pad, known)[0]) < 2e-5
    for name, g_, r in zip("qkv", grads, ref_grads):
        assert max_err(g_, r) < 5e-5, f"d{name}"
    tm._CHOSEN.clear()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_performer_gpu_style_blocks(monkeypatch, causal):
    """Feature blocks of 32 over m = 70 (three blocks, the last partial), row tiles of 16; causal
    chunks of 16 with BLOCK_F = 32."""
    dev = require(PERFORMER, "triton", dtype=torch.float32, head_dim=16, causal=causal, nb_features=70)
    from biogen.ops.triton import performer as tp

    row = _config().of(1, 1, BLOCK_L=16, BLOCK_M=32)
    chunk = _config().of(1, 1, BLOCK_C=16, BLOCK_F=32)
    monkeypatch.setattr(tp, "_configs", lambda kernel, *a: [chunk if kernel.startswith("causal") else row])
    q, k, v, w, pad = performer_inputs(2, 2, 33, 16, 70, device=dev)
    _check_fwd_bwd("triton", q, k, v, w, pad, "softmax", causal=causal)
