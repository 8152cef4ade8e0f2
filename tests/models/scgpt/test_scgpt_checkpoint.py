"""Loading original scGPT checkpoints (bowang-lab/scGPT v0.2.4 ``TransformerModel``).

``tests/data/scgpt_v0.2.4_tiny_params.json`` lists the reference's parameter names and shapes for a
tiny config (ntoken 10, d_model 16, nhead 2, d_hid 24, nlayers 2, nlayers_cls 3, n_cls 4,
do_mvc=True, continuous values, no batch labels). It was derived by reading
``TransformerModel.__init__`` in scgpt/model/model.py: modules in registration order ``encoder``
(GeneEncoder: embedding, enc_norm), ``value_encoder`` (ContinuousValueEncoder: linear1, linear2,
norm), ``transformer_encoder.layers.N`` (nn.TransformerEncoderLayer: self_attn.in_proj_weight /
in_proj_bias / out_proj, linear1, linear2, norm1, norm2; with flash-attn, FlashMHA's Wqkv /
out_proj instead), ``decoder.fc`` (Sequential Linear-LeakyReLU-Linear-LeakyReLU-Linear),
``cls_decoder`` (_decoder = [Linear, ReLU, LayerNorm] x 2, out_layer), ``mvc_decoder`` ("inner
product": gene2query, W without bias). When scgpt 0.2.4 is installed, the optional test at the end
checks the list against the instantiated reference and compares outputs.
"""

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from biogen.models.scgpt import load_scgpt_checkpoint, map_reference_keys

SPEC = json.loads((Path(__file__).parent.parent.parent / "data" / "scgpt_v0.2.4_tiny_params.json").read_text())


def _random_state(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*shape, generator=g) for k, shape in params}


def _write(folder, state, args=None, vocab=None):
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.path.join(folder, "best_model.pt"))
    Path(folder, "args.json").write_text(json.dumps(args or SPEC["args"]))
    Path(folder, "vocab.json").write_text(json.dumps(vocab or SPEC["vocab"]))
    return folder


@pytest.mark.parametrize("naming", ["params_flash", "params_torch"])
def test_every_reference_parameter_lands_in_place(tmp_path, naming):
    ref = _random_state(SPEC[naming])
    model, vocab = load_scgpt_checkpoint(_write(tmp_path / "ck", ref))
    c = model.config
    assert (c.d_model, c.nhead, c.nlayers, c.d_hid, c.nlayers_cls, c.mvc, model.n_classes) == (16, 2, 2, 24, 3, True, 4)
    assert vocab.genes == [f"G{i}" for i in range(7)]
    sd = model.state_dict()
    mapped, ignored, unsupported = map_reference_keys(ref)
    assert not ignored and not unsupported
    assert set(mapped) == set(sd)  # nothing missing, nothing left over
    rv = SPEC["vocab"]
    for k, v in ref.items():
        new = k.replace("in_proj_weight", "Wqkv.weight").replace("in_proj_bias", "Wqkv.bias")
        if k == "encoder.embedding.weight":
            for g in vocab.genes:
                torch.testing.assert_close(sd[new][vocab[g]], v[rv[g]], rtol=0, atol=0)
            torch.testing.assert_close(sd[new][vocab.pad_id], v[rv["<pad>"]], rtol=0, atol=0)
            torch.testing.assert_close(sd[new][vocab.cls_id], v[rv["<cls>"]], rtol=0, atol=0)
        else:
            torch.testing.assert_close(sd[new], v, rtol=0, atol=0)


def test_mapped_layer_computes_what_torch_layer_computes(tmp_path):
    # The in_proj -> Wqkv rename is only right if the row layouts agree: run both layers.
    ref = _random_state(SPEC["params_torch"], seed=1)
    model, _ = load_scgpt_checkpoint(_write(tmp_path / "ck", ref))
    layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True).eval()
    layer.load_state_dict({k.split("layers.0.", 1)[1]: v for k, v in ref.items() if ".layers.0." in k})
    x = torch.randn(2, 7, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    with torch.no_grad():
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            exp = layer(x, src_key_padding_mask=pad)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        got = model.transformer_encoder.layers[0](x, pad)
    torch.testing.assert_close(got[~pad], exp[~pad], rtol=1e-5, atol=1e-5)


def test_pretrained_one_class_head_is_dropped(tmp_path):
    params = [[k, [1, 16] if k == "cls_decoder.out_layer.weight" else ([1] if k == "cls_decoder.out_layer.bias" else s)]
              for k, s in SPEC["params_flash"]]
    model, _ = load_scgpt_checkpoint(_write(tmp_path / "ck", _random_state(params)))
    assert model.cls_decoder is None and model.n_classes == 0
    assert any(k.startswith("cls_decoder.") for k in model.ignored_checkpoint_keys)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_scgpt_checkpoint(tmp_path / "nope")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="best_model.pt"):
        load_scgpt_checkpoint(tmp_path / "empty")
    ref = _random_state(SPEC["params_flash"])
    with pytest.raises(ValueError, match="nlayers=3 disagrees"):
        load_scgpt_checkpoint(_write(tmp_path / "a", ref, args=dict(SPEC["args"], nlayers=3)))
    bad = dict(ref, **{"dsbn.bns.0.weight": torch.ones(16)})
    with pytest.raises(ValueError, match="dsbn"):
        load_scgpt_checkpoint(_write(tmp_path / "b", bad))
    args = dict(SPEC["args"])
    del args["nheads"]
    with pytest.raises(ValueError, match="nheads"):
        load_scgpt_checkpoint(_write(tmp_path / "c", ref, args=args))


# ------------------------------------------------------------------ optional: the real reference code


def _reference_module():
    """scgpt/model/model.py of an installed scgpt (pip install --no-deps scgpt==0.2.4), imported by
    file path under a stand-in package: scgpt's own __init__ imports far more than is installable."""
    spec = importlib.util.find_spec("scgpt")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scgpt is not installed (pip install --no-deps scgpt==0.2.4)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    pkg = types.ModuleType("_scgpt_ref")
    pkg.__path__ = [str(folder)]
    sys.modules.setdefault("_scgpt_ref", pkg)
    mods = {}
    for name in ("dsbn", "grad_reverse", "model"):
        full = f"_scgpt_ref.{name}"
        if full not in sys.modules:
            s = importlib.util.spec_from_file_location(full, folder / f"{name}.py")
            m = importlib.util.module_from_spec(s)
            sys.modules[full] = m
            s.loader.exec_module(m)
        mods[name] = sys.modules[full]
    return mods["model"]


@pytest.mark.parametrize("n_batches", [None, 3])
def test_reference_model_outputs_match(tmp_path, n_batches):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_mod = _reference_module()
    vocab_map = SPEC["vocab"]
    torch.manual_seed(0)
    ref = ref_mod.TransformerModel(
        ntoken=10, d_model=16, nhead=2, d_hid=24, nlayers=2, nlayers_cls=3, n_cls=4, vocab=vocab_map,
        dropout=0.0, pad_token="<pad>", pad_value=-2, do_mvc=True, input_emb_style="continuous",
        use_fast_transformer=False, use_batch_labels=n_batches is not None, num_batch_labels=n_batches).eval()
    if n_batches is None:  # the stored list is exactly what the reference builds
        assert [[k, list(v.shape)] for k, v in ref.state_dict().items()] == SPEC["params_torch"]
    model, vocab = load_scgpt_checkpoint(_write(tmp_path / "ck", ref.state_dict()))
    B, L = 3, 6
    ref_ids = torch.tensor([[8, 0, 3, 5, 6, 2], [8, 4, 1, 7, 7, 7], [8, 6, 5, 4, 3, 2]])
    pad = ref_ids == vocab_map["<pad>"]
    vals = torch.randint(0, 51, (B, L)).float().masked_fill(pad, -2.0)
    vals[:, 0] = 0.0
    inv = {i: t for t, i in vocab_map.items()}
    ids = torch.tensor([[vocab[inv[int(i)]] if inv[int(i)] not in ("<pad>", "<cls>") else
                         (vocab.pad_id if inv[int(i)] == "<pad>" else vocab.cls_id) for i in row] for row in ref_ids])
    bids = None if n_batches is None else torch.tensor([0, 2, 1])
    assert model.config.n_batches == n_batches
    with torch.no_grad():
        exp = ref(ref_ids, vals, pad, batch_labels=bids, CLS=True, MVC=True)
        got = model(ids, vals, pad, batch_ids=bids)
    valid = ~pad
    torch.testing.assert_close(got.expr_pred[valid], exp["mlm_output"][valid], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.mvc_pred[valid], exp["mvc_output"][valid], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.cell_emb, exp["cell_emb"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.logits, exp["cls_output"], rtol=1e-4, atol=1e-5)


def test_finetune_from_reference_checkpoint(tmp_path):
    import anndata as ad
    import numpy as np
    import pandas as pd

    from biogen.models.scgpt import ScGPT

    folder = _write(tmp_path / "ck", _random_state(SPEC["params_flash"]))
    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, size=(20, 7)).astype(np.float32)
    a = ad.AnnData(X=X, obs=pd.DataFrame({"t": ["a", "b"] * 10}, index=[f"c{i}" for i in range(20)]),
                   var=pd.DataFrame(index=[f"G{i}" for i in range(7)]))
    m = ScGPT.from_scgpt_checkpoint(folder, a, label_key="t", device="cpu")
    assert m.module.n_classes == 2 and m.label_categories == ["a", "b"]
    before = m.module.encoder.embedding.weight.detach().clone()
    m.fit(epochs=1, batch_size=10, validation_fraction=0, progress=False)
    assert not torch.equal(before, m.module.encoder.embedding.weight)
    out = m.predict(a, copy=True)
    assert out.obsm["scgpt_proba"].shape == (20, 2)
