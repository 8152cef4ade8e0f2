"""Backward edge cases of masked_gene_attention's GPU kernels (triton, cuda) against the float64 reference.

The kernels split the gradient of unknown tokens (self term) from that of known keys; these cases
put every token on one side: cells that are all unknown, all padding, or all known.
"""

from __future__ import annotations

import pytest
import torch

from biogen.ops import masked_gene_attention
from biogen.ops.masked_attention import OP
from biogen.ops.reference import masked_gene_attention_ref

from .helpers import interpreted, max_err, require
from .test_masked_attention import make_inputs

GPU_BACKENDS = ["triton", "cuda"]


def _grads(backend, q, k, v, pad, known, gout):
    args = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = masked_gene_attention(*args, key_padding_mask=pad, known=known, backend=backend)
    return (out, *torch.autograd.grad(out, args, gout))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gradients_of_degenerate_cells(backend):
    dev = require(OP, backend, dtype=torch.float32, head_dim=24)
    B, H, L, D = 4, 2, (19 if interpreted(backend) else 150), 24
    q, k, v, pad, known = make_inputs(B, H, L, D, device=dev)
    pad[1] = True  # all padding: zero output and zero gradients
    known[0] = False  # all unknown: every query attends only itself
    known[2] = True  # all known: plain attention with padding
    gout = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(1)).to(dev)
    got = _grads(backend, q, k, v, pad, known, gout)
    ref_args = [t.detach().double().cpu().requires_grad_(True) for t in (q, k, v)]
    ref, _ = masked_gene_attention_ref(*ref_args, pad.cpu(), known.cpu())
    want = (ref, *torch.autograd.grad(ref, ref_args, gout.double().cpu()))
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), name
        assert max_err(g, r) < 5e-5, name
    for g in got:
        assert torch.equal(g[1].cpu(), torch.zeros_like(g[1].cpu()))  # the all-padding cell
    # an all-unknown cell: out_i = v_i exactly, so dv_i = dO_i on valid rows (0 on padding)
    want_dv0 = torch.where(pad[0, None, :, None], 0.0, gout[0]).cpu()
    torch.testing.assert_close(got[3][0].cpu(), want_dv0, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_nan_in_padding_does_not_change_gradients(backend):
    dev = require(OP, backend, dtype=torch.float32, head_dim=16)
    shape = (2, 1, 17, 16) if interpreted(backend) else (2, 3, 150, 16)
    q, k, v, pad, known = make_inputs(*shape, device=dev, pad_frac=0.5)
    pad[0, -1] = True
    gout = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dev)
    clean = _grads(backend, q, k, v, pad, known, gout)
    q2, k2, v2, g2 = (t.clone() for t in (q, k, v, gout))
    for t in (q2, k2, v2, g2):
        t.masked_fill_(pad[:, None, :, None], float("nan"))
    dirty = _grads(backend, q2, k2, v2, pad, known, g2)
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)
