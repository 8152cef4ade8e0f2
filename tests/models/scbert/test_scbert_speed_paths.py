"""scBERT speed / memory paths: fused QKV and head-major output projection, GELU recomputation,
bf16 autocast training (checked against plain autograd compositions and the float32 model)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from biogen.models.scbert import ScBERT, ScBERTConfig, ScBERTModel
from biogen.nn import PerformerAttention
from biogen.ops import performer_attention
from biogen.sc.datasets import synthetic


def _plain_attention(layer, x, kpm):
    """Independent composition: three separate projections, merged-head copy, plain nn.Linear."""
    q, k, v = (rearrange(f(x), "b n (h d) -> b h n d", h=layer.heads) for f in (layer.to_q, layer.to_k, layer.to_v))
    out = performer_attention(q, k, v, layer.projection, key_padding_mask=kpm, backend=layer.backend)
    return layer.to_out(rearrange(out, "b h n d -> b n (h d)"))


def _grads(module, loss):
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_attention_layer_matches_plain_composition(backend, qkv_bias):
    torch.manual_seed(0)
    layer = PerformerAttention(12, heads=2, dim_head=10, nb_features=16, qkv_bias=qkv_bias, redraw_interval=None,
                               backend=backend)
    x = torch.randn(2, 9, 12, requires_grad=True)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True
    w = torch.randn(2, 9, 12)
    y = layer(x, key_padding_mask=kpm)
    got = _grads(layer, (y * w).sum())
    gx = x.grad.clone()
    x.grad = None
    ref_y = _plain_attention(layer, x, kpm)
    ref = _grads(layer, (ref_y * w).sum())
    torch.testing.assert_close(y, ref_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-6)
    assert got.keys() == ref.keys() and len(got) == (8 if qkv_bias else 5)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_feed_forward_matches_plain_composition():
    torch.manual_seed(0)
    m = ScBERTModel(ScBERTConfig.preset("tiny", dim=12, ff_mult=3), 10)
    ff = m.layers[0].ff
    x = torch.randn(2, 11, 12, requires_grad=True)
    y = ff(x)
    got, gx = _grads(ff, y.square().sum()), x.grad.clone()
    x.grad = None
    ref_y = ff.w2(F.gelu(ff.w1(x)))
    ref = _grads(ff, ref_y.square().sum())
    torch.testing.assert_close(y, ref_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-6)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_layer_saves_no_activation_twice():
    """Bytes kept for the backward of one encoder layer: the fused q/k/v storage (3 * h*d per
    position), the attention output (h*d) and the FF pre-activation (ff_mult * dim) are the only
    per-position tensors wider than dim; the plain composition keeps q, k, v, the output, its
    merged-head copy, the pre-activation and GELU's output (the last two per position)."""
    c = ScBERTConfig.preset("tiny", dim=12, heads=2, dim_head=10, ff_mult=3, nb_features=16)
    torch.manual_seed(0)
    layer = ScBERTModel(c, 63).layers[0]
    x = torch.randn(2, 64, 12, requires_grad=True)

    def wide_bytes(fn):
        storages = {}

        def pack(t):
            if t.numel() > x.numel():  # wider than dim per position (parameters and buffers are smaller)
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(storages.values())

    per_pos = 2 * 64 * 4  # positions x float32 bytes
    hd, ff = c.heads * c.dim_head, c.ff_mult * c.dim
    # plus the C++ kernel's key state: C = phi(K)^T V, z and the stabiliser per (batch, head), not per position
    from biogen.ops.performer import _state_size

    state = 2 * c.heads * _state_size(c.dim_head, c.nb_features) * 4
    assert wide_bytes(lambda: layer(x)) == per_pos * (3 * hd + hd + ff) + state

    def plain():
        a = _plain_attention(layer.attn, layer.attn_norm(x), None)
        h = x + a
        f = layer.ff
        return h + f.w2(F.gelu(f.w1(layer.ff_norm(h))))

    assert wide_bytes(plain) == per_pos * (3 * hd + 2 * hd + 2 * ff) + state


def _tiny_step(model, tokens, target, autocast):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with ctx:
        enc = model.encode(tokens)
        logits = model.mlm_head(enc)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))
    return enc, logits, loss, _grads(model, loss)


def test_bf16_autocast_step_close_to_float32():
    torch.manual_seed(0)
    model = ScBERTModel(ScBERTConfig.preset("tiny", depth=2), 40).train()
    tokens = torch.randint(0, 7, (4, 41))
    target = torch.randint(0, 6, (4, 41))
    _, _, loss32, g32 = _tiny_step(model, tokens, target, autocast=False)
    enc16, logits16, loss16, g16 = _tiny_step(model, tokens, target, autocast=True)
    # the matmuls (projections, feed-forward, MLM head) ran in bf16; norms and loss stay float32
    assert logits16.dtype == torch.bfloat16 and enc16.dtype == torch.float32
    assert torch.isfinite(loss16)
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%) on every matmul input: the loss
    # (a mean over many positions) moves by far less than that, each gradient (rounding errors of
    # two layers' backward matmuls, measured ~1%) by a few percent at most
    torch.testing.assert_close(loss16, loss32, rtol=5e-3, atol=0)
    assert g16.keys() == g32.keys()
    for n, g in g32.items():
        assert g16[n].dtype == torch.float32 and torch.isfinite(g16[n]).all(), n
        rel = float((g16[n] - g).norm() / g.norm().clamp_min(1e-12))
        assert rel < 3e-2, (n, rel)


def test_fit_and_pretrain_mixed_precision_on_cpu():
    data = synthetic(n_cells=60, n_genes=30, n_types=2, n_batches=1, n_donors=1, seed=3, n_markers=5,
                     marker_fold=30.0, mean_library=500.0)
    torch.manual_seed(0)
    m = ScBERT(data, label_key="cell_type", config="tiny", device="cpu")
    hist = m.pretrain(epochs=1, batch_size=8, validation_fraction=0.0, progress=False, mixed_precision=True)
    assert np.isfinite(hist[-1]["train_loss"])
    hist = m.fit(epochs=3, batch_size=8, lr=2e-3, validation_fraction=0.2, progress=False, mixed_precision=True)
    assert len(hist) == 3 and all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in hist)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    for p in m.module.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
    m.predict(data, unassigned_threshold=None)
    assert np.isfinite(data.obsm["scbert_proba"]).all()
