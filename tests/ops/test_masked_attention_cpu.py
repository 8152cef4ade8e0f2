"""The C++ CPU kernel of masked gene attention beyond the shared backend tests: several key and
query tiles (64 x 64) in the backward, lse, low-precision gradients, degenerate cells in the
backward, thread-count independence and every SIMD build's backward."""

from __future__ import annotations


import pytest
import torch

from biogen.ops import masked_gene_attention
from biogen.ops.masked_attention import OP, _fwd_op
from biogen.ops.reference import masked_gene_attention_ref

from .helpers import assert_close_2x, max_err, run_with_cpu_capability
from .test_masked_attention import make_inputs, truth

pytestmark = pytest.mark.skipif("cpu" not in OP.reasons, reason="biogen._C built without the CPU kernel")


def grads(q, k, v, pad, known, gout, backend, scale=None):
    args = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = masked_gene_attention(*args, key_padding_mask=pad, known=known, scale=scale, backend=backend)
    return (out, *torch.autograd.grad(out, args, gout))


def ref_grads(q, k, v, pad, known, gout, scale=None, upcast=True):
    cast = (lambda t: t.detach().double()) if upcast else (lambda t: t.detach())
    args = [cast(t).requires_grad_(True) for t in (q, k, v)]
    out, _ = masked_gene_attention_ref(*args, pad, known, scale, upcast=upcast)
    return (out, *torch.autograd.grad(out, args, cast(gout)))


@pytest.mark.parametrize("shape", [(1, 2, 300, 64), (2, 1, 200, 40), (1, 1, 150, 128)])
@pytest.mark.parametrize("masks", ["padding", "generative"])
def test_gradients_across_several_key_and_query_tiles(shape, masks):
    """> 128 valid queries and > 64 known keys: the tile loops, partial tiles and dK/dV scatter."""
    q, k, v, pad, known = make_inputs(*shape, pad_frac=0.2, known_frac=0.7)
    known = known if masks == "generative" else None
    gout = torch.randn(shape, dtype=torch.float32)
    got = grads(q, k, v, pad, known, gout, "cpu", scale=0.3)
    ref = ref_grads(q, k, v, pad, known, gout, scale=0.3)
    for name, g_, r in zip(["out", "dq", "dk", "dv"], got, ref):
        assert max_err(g_, r) < 5e-5, name


def test_lse_matches_reference_and_is_minus_inf_on_padding():
    q, k, v, pad, known = make_inputs(2, 2, 150, 32)
    pad[1, 100:] = True
    _, lse = _fwd_op(q, k, v, pad, known, 0.2, "cpu")
    _, ref = truth(q, k, v, pad, known, 0.2)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 150)
    valid = ~pad[:, None, :].expand_as(lse)
    assert torch.equal(torch.isneginf(lse), ~valid)
    assert max_err(lse[valid], ref[valid]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_2x_rule(dtype):
    q, k, v, pad, known = make_inputs(1, 2, 130, 64, dtype=dtype)
    gout = torch.randn(q.shape).to(dtype)
    got = grads(q, k, v, pad, known, gout, "cpu")
    ref = ref_grads(q, k, v, pad, known, gout)
    lowp = ref_grads(q, k, v, pad, known, gout, upcast=False)
    for g_, lp, r in zip(got, lowp, ref):
        assert g_.dtype == dtype
        assert_close_2x(g_, lp, r, atol=1e-3)


def test_degenerate_cells_backward():
    """An all-unknown cell (only self terms), an all-padding cell (all-zero gradients)."""
    B, H, L, D = 3, 2, 70, 16
    q, k, v, _, known = make_inputs(B, H, L, D)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1] = True
    pad[2, 50:] = True
    known[0] = False
    gout = torch.randn(B, H, L, D)
    got = grads(q, k, v, pad, known, gout, "cpu")
    ref = ref_grads(q, k, v, pad, known, gout)
    for g_, r in zip(got, ref):
        assert torch.isfinite(g_).all()
        assert max_err(g_, r) < 5e-5
    for g_ in got[1:]:
        assert torch.equal(g_[1], torch.zeros_like(g_[1]))
        assert torch.equal(g_[2, :, 50:], torch.zeros_like(g_[2, :, 50:]))


def test_nan_in_padding_does_not_change_gradients():
    q, k, v, pad, known = make_inputs(2, 2, 150, 32, pad_frac=0.5)
    gout = torch.randn(q.shape)
    a = grads(q, k, v, pad, known, gout, "cpu")
    q2, k2, v2 = (t.masked_fill(pad[:, None, :, None], float("nan")) for t in (q, k, v))
    b = grads(q2, k2, v2, pad, known, gout, "cpu")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_result_does_not_depend_on_thread_count():
    """Each query tile (forward) and each (batch, head) (backward) is owned by one thread and reduced
    in a fixed order, so 1 and 3 threads give bit-identical results."""
    q, k, v, pad, known = make_inputs(2, 3, 200, 32)
    gout = torch.randn(q.shape)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grads(q, k, v, pad, known, gout, "cpu")
        torch.set_num_threads(3)
        three = grads(q, k, v, pad, known, gout, "cpu")
    finally:
        torch.set_num_threads(before)
    for x, y in zip(one, three):
        assert torch.equal(x, y)


@pytest.mark.parametrize("cap", ["base", "avx2", "avx512"])
def test_every_compiled_simd_level_backward_matches_reference(cap):
    """Each per-ISA build's backward (different register blocking per ISA), forced in a subprocess."""
    run_with_cpu_capability(OP, cap, (
        ""
        "from tests.ops.test_masked_attention_cpu import make_inputs, grads, ref_grads, max_err\n"
        "q,k,v,pad,known = make_inputs(1,2,150,40, pad_frac=0.2, known_frac=0.7)\n"
        "gout = torch.randn(q.shape)\n"
        "for name, g, r in zip(['out','dq','dk','dv'], grads(q,k,v,pad,known,gout,'cpu'),\n"
        "                      ref_grads(q,k,v,pad,known,gout)):\n"
        "    err = max_err(g, r); assert err < 5e-5, (name, err)\n"
    ))
