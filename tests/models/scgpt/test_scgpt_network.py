"""The scGPT-style network on random tensors (no AnnData): modes, masks, heads, generation."""

import math

import pytest
import torch
from torch import nn

from biogen.models.scgpt.network import ScGPTConfig, ScGPTModel
from biogen.nn.transformer import TransformerEncoderLayer

N_TOKENS, PAD, CLS = 40, 0, 1


def _batch(B=4, L=12, seed=0, n_classes=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(N_TOKENS - 3, generator=g)[: L] + 3 for _ in range(B)])
    ids[:, 0] = CLS
    vals = torch.randint(0, 51, (B, L), generator=g).float()
    vals[:, 0] = 0.0
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, L - 3:] = True
    pad[2, L - 1:] = True
    ids[pad] = PAD
    mlm = (torch.rand(B, L, generator=g) < 0.4) & ~pad
    mlm[:, 0] = False
    mlm[:, 1] = True  # every cell has at least one target
    return dict(gene_ids=ids, values=vals.masked_fill(pad, -2.0), target_values=vals, padding_mask=pad,
                mlm_mask=mlm, known=torch.ones(B, L, dtype=torch.bool),
                labels=torch.randint(0, n_classes, (B,), generator=g))


def _model(**kw):
    n_classes = kw.pop("n_classes", 3)
    return ScGPTModel(ScGPTConfig.preset("tiny", **kw), N_TOKENS, PAD, n_classes=n_classes)


@pytest.mark.parametrize("input_style", ["continuous", "category"])
@pytest.mark.parametrize("objective", ["mlm", "generative", "both", "classify"])
def test_every_objective_trains(objective, input_style):
    m = _model(input_style=input_style)
    batch = _batch()
    parts = m.loss(batch, objective)
    assert torch.isfinite(parts["loss"])
    parts["loss"].backward()
    assert m.encoder.embedding.weight.grad.abs().sum() > 0
    assert m.transformer_encoder.layers[0].self_attn.Wqkv.weight.grad.abs().sum() > 0
    head = m.cls_decoder.out_layer if objective == "classify" else m.decoder.fc[4]
    assert head.weight.grad.abs().sum() > 0
    # The <pad> embedding row never learns.
    assert m.encoder.embedding.weight.grad[PAD].abs().sum() == 0
    # One optimiser step lowers the loss of this batch.
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    before = float(parts["loss"].detach())
    for _ in range(3):
        opt.zero_grad()
        loss = m.loss(batch, objective)["loss"]
        loss.backward()
        opt.step()
    assert float(m.loss(batch, objective)["loss"].detach()) < before


def test_mlm_loss_is_mse_on_masked_positions():
    m = _model(mvc=False).eval()
    b = _batch()
    parts = m.loss(b, "mlm")
    out = m(b["gene_ids"], b["values"].masked_fill(b["mlm_mask"], -1.0), b["padding_mask"])
    sel = b["mlm_mask"]
    expected = ((out.expr_pred[sel] - b["target_values"][sel]) ** 2).mean()
    torch.testing.assert_close(parts["mlm"], expected)
    # The loss must not see the true values at masked positions.
    b2 = dict(b, values=b["values"].masked_fill(sel, 1234.0))
    torch.testing.assert_close(m.loss(b2, "mlm")["mlm"], parts["mlm"])


def test_classify_loss_matches_cross_entropy_with_weights():
    m = _model().eval()
    b = _batch()
    w = torch.tensor([1.0, 2.0, 0.5])
    logits = m(b["gene_ids"], b["values"], b["padding_mask"]).logits
    torch.testing.assert_close(m.loss(b, "classify", class_weights=w)["cls"],
                               nn.functional.cross_entropy(logits, b["labels"], weight=w))


def test_generative_mask_isolates_unknown_genes():
    m = _model().eval()
    b = _batch()
    ids, vals, pad = b["gene_ids"], b["values"], b["padding_mask"]
    known = ~b["mlm_mask"]
    j = 1  # an unknown gene in every cell
    assert not known[:, j].any()
    base = m(ids, vals, pad, known).hidden
    # Its value is hidden: changing it changes nothing at all.
    v2 = vals.clone()
    v2[:, j] += 7.0
    torch.testing.assert_close(m(ids, v2, pad, known).hidden, base, rtol=0, atol=0)
    # Its identity reaches only its own output.
    ids2 = ids.clone()
    ids2[:, j] = N_TOKENS - 1 - (ids[:, j] - 3)
    assert (ids2[:, j] != ids[:, j]).all()
    out2 = m(ids2, vals, pad, known).hidden
    others = torch.ones_like(known)
    others[:, j] = False
    others &= ~pad
    torch.testing.assert_close(out2[others], base[others], rtol=1e-5, atol=1e-6)
    assert (out2[:, j] - base[:, j]).abs().max() > 1e-3
    # Sensitivity of this test: without the generative mask the change spreads to other tokens.
    spread = (m(ids2, vals, pad, None).hidden - m(ids, vals, pad, None).hidden)[others].abs().max()
    assert spread > 1e-3


def test_padding_content_and_length_do_not_matter():
    m = _model().eval()
    b = _batch()
    ids, vals, pad = b["gene_ids"], b["values"], b["padding_mask"]
    ref = m(ids, vals, pad)
    vals2 = vals.masked_fill(pad, float("nan"))
    ids2 = ids.masked_fill(pad, 7)
    got = m(ids2, vals2, pad)
    valid = ~pad
    torch.testing.assert_close(got.hidden[valid], ref.hidden[valid], rtol=0, atol=0)
    # Extra padding columns leave the valid outputs unchanged.
    ext = m(torch.cat([ids, torch.zeros(4, 5, dtype=torch.long)], 1),
            torch.cat([vals, torch.full((4, 5), -2.0)], 1),
            torch.cat([pad, torch.ones(4, 5, dtype=torch.bool)], 1))
    torch.testing.assert_close(ext.hidden[:, :12][valid], ref.hidden[valid], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ext.logits, ref.logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_layer_matches_torch_transformer_encoder_layer(pre_norm):
    torch.manual_seed(1)
    d, h, ff = 32, 4, 48
    ours = TransformerEncoderLayer(d, h, ff, dropout=0.0, pre_norm=pre_norm).eval()
    ref = nn.TransformerEncoderLayer(d, h, ff, dropout=0.0, batch_first=True, norm_first=pre_norm).eval()
    sd = {k.replace("self_attn.Wqkv.weight", "self_attn.in_proj_weight")
          .replace("self_attn.Wqkv.bias", "self_attn.in_proj_bias"): v for k, v in ours.state_dict().items()}
    ref.load_state_dict(sd)
    x = torch.randn(3, 9, d)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    with torch.no_grad():
        got = ours(x, pad)
        # fast path off: it returns zeros (not the computed rows) at padded positions
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            exp = ref(x, src_key_padding_mask=pad)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(got[~pad], exp[~pad], rtol=1e-5, atol=1e-5)


def test_generate_fills_unknown_genes_in_k_steps_by_confidence():
    m = _model()
    b = _batch(B=3, L=16)
    ids, vals, pad = b["gene_ids"], b["values"], b["padding_mask"]
    known = ~b["mlm_mask"]
    unknown = ~known & ~pad
    K = 3
    res = m.generate(ids, vals, pad, known, n_iters=K)
    assert m.training  # mode restored
    assert ((res.step >= 0) == unknown).all()
    torch.testing.assert_close(res.values[~unknown], vals[~unknown], rtol=0, atol=0)
    for i in range(3):
        n = int(unknown[i].sum())
        counts = torch.bincount(res.step[i][unknown[i]], minlength=K)
        left = n
        for it in range(K):  # ceil(remaining / iterations left) each step
            take = math.ceil(left / (K - it))
            assert counts[it] == take
            left -= take
    # Step 0 picked the genes whose two heads agree best, from an independent eval-mode pass.
    m.eval()
    with torch.no_grad():
        kn = known | pad
        out = m(ids, vals, pad, kn)
    conf = -(out.expr_pred - out.mvc_pred).abs()
    for i in range(3):
        chosen = conf[i][res.step[i] == 0]
        rest = conf[i][(res.step[i] > 0)]
        assert chosen.min() >= rest.max()
        torch.testing.assert_close(res.values[i][res.step[i] == 0], out.expr_pred[i][res.step[i] == 0])


def _generate_loop(m, ids, vals, pad, known, K):
    """ScGPTModel.generate written out cell by cell: each step one eval-mode pass with the current
    known set; of each cell's remaining unknown genes, the ceil(remaining / steps left) with the
    smallest |expr_pred - mvc_pred| (ties: the earlier position) become known with expr_pred as value."""
    m.eval()
    vals = vals.clone()
    kn = known | pad
    kn[:, 0] = True
    step = torch.full(ids.shape, -1, dtype=torch.long)
    for it in range(K):
        with torch.no_grad():
            out = m(ids, vals, pad, kn)
        for i in range(ids.shape[0]):
            rem = [j for j in range(ids.shape[1]) if not kn[i, j]]
            if not rem:
                continue
            gap = {j: abs(float(out.expr_pred[i, j]) - float(out.mvc_pred[i, j])) for j in rem}
            for j in sorted(rem, key=lambda j: gap[j])[: math.ceil(len(rem) / (K - it))]:
                p = float(out.expr_pred[i, j])
                if m.config.input_style == "category":
                    p = min(max(round(p), 0), m.config.n_bins - 1)
                vals[i, j] = p
                step[i, j] = it
        kn = kn | (step >= 0)
    return vals, step


@pytest.mark.parametrize("input_style", ["continuous", "category"])
@pytest.mark.parametrize("K", [1, 3])
def test_generate_equals_step_by_step_loop(input_style, K):
    """Every step, not only the first: later genes condition on the values generated before them."""
    torch.manual_seed(0)
    m = _model(input_style=input_style)
    b = _batch(B=3, L=16, seed=1)
    ids, vals, pad = b["gene_ids"], b["values"], b["padding_mask"]
    known = ~b["mlm_mask"]
    res = m.generate(ids, vals, pad, known, n_iters=K)
    want_vals, want_step = _generate_loop(m, ids, vals, pad, known, K)
    assert torch.equal(res.step, want_step)
    torch.testing.assert_close(res.values, want_vals, rtol=0, atol=0)
    assert (want_step >= 0).sum() == (~known & ~pad).sum()


def test_avg_pool_cell_embedding_ignores_padding():
    m = _model(cell_emb_style="avg-pool").eval()
    b = _batch()
    out = m(b["gene_ids"], b["values"], b["padding_mask"])
    valid = ~b["padding_mask"]
    torch.testing.assert_close(out.cell_emb[0], out.hidden[0][valid[0]].mean(0))


def test_batch_embedding_is_required_and_used():
    m = _model(n_batches=2).eval()
    b = _batch()
    with pytest.raises(ValueError, match="batch_ids"):
        m(b["gene_ids"], b["values"], b["padding_mask"])
    o0 = m(b["gene_ids"], b["values"], b["padding_mask"], batch_ids=torch.zeros(4, dtype=torch.long))
    o1 = m(b["gene_ids"], b["values"], b["padding_mask"], batch_ids=torch.ones(4, dtype=torch.long))
    assert (o0.expr_pred - o1.expr_pred).abs().max() > 1e-4
    with pytest.raises(ValueError, match="n_batches"):
        _model()(b["gene_ids"], b["values"], b["padding_mask"], batch_ids=torch.zeros(4, dtype=torch.long))


def test_autocast_bf16_close_to_fp32():
    m = _model().eval()
    b = _batch()
    with torch.no_grad():
        ref = m(b["gene_ids"], b["values"], b["padding_mask"]).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m(b["gene_ids"], b["values"], b["padding_mask"]).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("kw,msg", [
    (dict(d_model=30, nhead=4), "divisible"),
    (dict(max_seq_len=1), "max_seq_len"),
    (dict(input_style="binned"), "input_style"),
    (dict(dropout=1.0), "dropout"),
    (dict(n_bins=2), "n_bins"),
    (dict(d_model=512, nhead=2), "head dimension"),
])
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ScGPTConfig.preset("tiny", **kw)


def test_presets():
    p = ScGPTConfig.preset("paper")
    assert (p.d_model, p.nhead, p.nlayers, p.d_hid, p.n_bins) == (512, 8, 12, 512, 51)
    with pytest.raises(ValueError, match="preset"):
        ScGPTConfig.preset("huge")
    assert ScGPTConfig.from_dict(p.to_dict()) == p


def test_bad_tensor_inputs():
    m = _model()
    b = _batch()
    with pytest.raises(ValueError, match="gene_ids"):
        m(b["gene_ids"].float(), b["values"], b["padding_mask"])
    with pytest.raises(ValueError, match="padding_mask"):
        m(b["gene_ids"], b["values"], b["padding_mask"].long())
    with pytest.raises(ValueError, match="length 1"):
        m(b["gene_ids"][:, :1], b["values"][:, :1], None)


def test_unlabelled_cells_are_ignored():
    m = _model().eval()
    b = _batch()
    b2 = dict(b, labels=torch.tensor([0, -100, 2, -100]))
    logits = m(b["gene_ids"], b["values"], b["padding_mask"]).logits
    torch.testing.assert_close(m.loss(b2, "classify")["cls"],
                               nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([0, 2])))
    none = m.loss(dict(b, labels=torch.full((4,), -100)), "classify")["cls"]
    assert float(none.detach()) == 0.0


def _attention_backends():
    """Every non-reference backend of masked_gene_attention, skipped with the runtime's reasons."""
    from biogen.ops._runtime import BACKENDS
    from biogen.ops.masked_attention import OP

    out = []
    for b in BACKENDS:
        if b == "torch":
            continue
        why = OP.not_supported_reasons(b, torch.device("cpu"), dtype=torch.float32, head_dim=16)
        out.append(pytest.param(b, marks=pytest.mark.skip(reason="; ".join(why))) if why else b)
    return out


@pytest.mark.parametrize("backend", _attention_backends())
def test_model_on_every_attention_backend_matches_torch(backend):
    import biogen.ops

    m = _model()
    b = _batch()
    known = ~b["mlm_mask"]

    def run():
        m.zero_grad()
        out = m(b["gene_ids"], b["values"], b["padding_mask"], known)
        (out.expr_pred.sum() + out.logits.sum()).backward()
        return out.expr_pred.detach(), m.transformer_encoder.layers[0].self_attn.Wqkv.weight.grad.clone()

    with biogen.ops.use_backend("torch"):
        ref = run()
    with biogen.ops.use_backend(backend):
        got = run()
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-3, atol=1e-4)
