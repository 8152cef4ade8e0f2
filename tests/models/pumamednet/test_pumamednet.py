"""PumaMedNet: loss against independent formulas, denoising pairs, explanations, bias audit on a planted
shortcut, persistence, bad input and the CLI."""

from __future__ import annotations

import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from biogen.models import pumamednet as pm
from biogen.models.pumamednet import (
    PRESETS, PumaMedNet, PumaMedNetConfig, beta_vae_loss, bias_audit, corrupt, fit_classifier, fit_vae,
    kl_diag_gaussian, latent_traversal, make_synthetic_cxr, random_geometry,
)

TINY = PRESETS["tiny"]


# ----------------------------------------------------------------------------------------- loss
def test_kl_matches_closed_form_in_float64():
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(5, 7, generator=g) * 2
    logvar = torch.randn(5, 7, generator=g) * 1.5
    got = kl_diag_gaussian(mu, logvar)
    m, sd = mu.double().numpy(), np.exp(0.5 * logvar.double().numpy())
    # KL(N(m, s^2) || N(0, 1)) = -log s + (s^2 + m^2) / 2 - 1/2, per axis, summed
    want = (-np.log(sd) + (sd ** 2 + m ** 2) / 2 - 0.5).sum(-1)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-5)
    d = torch.distributions
    kl64 = d.kl_divergence(d.Normal(mu.double(), torch.from_numpy(sd)), d.Normal(0.0, 1.0)).sum(-1)
    np.testing.assert_allclose(want, kl64.numpy(), rtol=1e-12)


def test_beta_vae_loss_is_the_gaussian_negative_elbo():
    g = torch.Generator().manual_seed(2)
    b, c, s, L = 3, 2, 6, 4
    x, xh = torch.rand(b, c, s, s, generator=g) * 2 - 1, torch.rand(b, c, s, s, generator=g) * 2 - 1
    mu, logvar = torch.randn(b, L, generator=g), torch.randn(b, L, generator=g)
    w = torch.rand(b, 1, s, s, generator=g) + 0.5
    beta, sigma = 3.0, 0.2
    out = beta_vae_loss(xh, x, mu, logvar, beta=beta, decoder_sigma=sigma, weights=w)
    # independent float64 loops
    X, XH, W = x.double().numpy(), xh.double().numpy(), w.double().numpy()
    rec = np.zeros(b)
    for i in range(b):
        for ch in range(c):
            for yy in range(s):
                for xx in range(s):
                    rec[i] += W[i, 0, yy, xx] * (XH[i, ch, yy, xx] - X[i, ch, yy, xx]) ** 2 / (2 * sigma ** 2)
    kl = (0.5 * (mu.double() ** 2 + logvar.double().exp() - 1 - logvar.double())).sum(-1).numpy()
    np.testing.assert_allclose(float(out.recon), rec.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(out.kl), kl.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(out.total), (rec + beta * kl).mean(), rtol=1e-5)
    # unweighted: the recon term is -log N(x | x_hat, sigma^2) up to its constant
    nll = -torch.distributions.Normal(xh.double(), sigma).log_prob(x.double()).flatten(1).sum(-1)
    const = c * s * s * np.log(sigma * np.sqrt(2 * np.pi))
    plain = beta_vae_loss(xh, x, mu, logvar, beta=beta, decoder_sigma=sigma)
    np.testing.assert_allclose(float(plain.recon), float((nll - const).mean()), rtol=1e-5)
    with pytest.raises(ValueError, match="recon shape"):
        beta_vae_loss(xh[:, :1], x, mu, logvar, beta=1.0, decoder_sigma=1.0)


def test_attention_weights_mean_one_with_floor_and_head_trained_only_by_its_own_loss():
    cfg = replace(TINY, attention_floor=0.25)
    model = PumaMedNet(cfg)
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        a = model.attention_weights(x)
    assert a.shape == (4, 1, 32, 32)
    torch.testing.assert_close(a.mean((1, 2, 3)), torch.ones(4))
    assert float(a.min()) >= 0.25 - 1e-6
    out = model.loss(x, x, torch.Generator().manual_seed(0))
    # the weighted reconstruction must not push the head (that would collapse it onto easy pixels)
    out.recon.backward(retain_graph=True)
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in model.attention_head.parameters())
    out.attention.backward()
    assert any(float(p.grad.abs().max()) > 0 for p in model.attention_head.parameters())
    # the model's recon term equals beta_vae_loss with the detached attention weights
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    o = model.loss(x, x, g1)
    recon, mu, logvar = model(x, g2)
    ref = beta_vae_loss(recon, x, mu, logvar, beta=cfg.beta, decoder_sigma=cfg.decoder_sigma,
                        weights=model.attention_weights(x))
    torch.testing.assert_close(o.recon, ref.recon)


# ------------------------------------------------------------------------------------ corruption
def test_denoising_targets_are_the_clean_images():
    x = torch.from_numpy(make_synthetic_cxr(6, size=32, seed=3).images)
    no_geom = replace(TINY, rotate_deg=0.0, p_hflip=0.0, p_vflip=0.0, perspective=0.0, p_erase=1.0)
    pair = corrupt(x, no_geom, torch.Generator().manual_seed(0))
    assert torch.equal(pair.targets, x)
    assert (pair.inputs - x).abs().flatten(1).max(1).values.min() > 0.1  # every input is corrupted
    # with geometry, the target is the warped clean image (same random draws), never blurred or erased
    cfg = replace(TINY, p_erase=1.0)
    pair = corrupt(x, cfg, torch.Generator().manual_seed(7))
    torch.testing.assert_close(pair.targets, random_geometry(x, cfg, torch.Generator().manual_seed(7)))
    # a flip is exact: compare with torch.flip
    flip = replace(no_geom, p_hflip=1.0)
    torch.testing.assert_close(random_geometry(x, flip, torch.Generator().manual_seed(0)), x.flip(-1))


def test_training_feeds_corrupted_inputs_and_clean_targets(monkeypatch):
    data = torch.from_numpy(make_synthetic_cxr(24, size=32, seed=4).images)
    cfg = replace(TINY, rotate_deg=0.0, p_hflip=0.0, p_vflip=0.0, perspective=0.0, epochs=1, batch_size=8)
    seen = []
    orig = PumaMedNet.loss

    def spy(self, inputs, targets, gen=None):
        seen.append((inputs.detach().clone(), targets.detach().clone()))
        return orig(self, inputs, targets, gen)

    monkeypatch.setattr(PumaMedNet, "loss", spy)
    fit_vae(PumaMedNet(cfg), data)
    assert sum(len(t) for _, t in seen) == len(data)
    flat = data.flatten(1)
    for inp, tgt in seen:
        dist = torch.cdist(tgt.flatten(1), flat)
        assert float(dist.min(1).values.max()) == 0.0  # every target is a data image, untouched
        assert not torch.equal(inp, tgt)


def test_finetune_updates_encoder_but_not_decoder():
    data = make_synthetic_cxr(16, size=32, seed=6)
    model = PumaMedNet(replace(TINY, batch_size=8))
    enc0 = [p.detach().clone() for p in model.encoder.parameters()]
    dec0 = [p.detach().clone() for p in model.decoder.parameters()]
    res = fit_classifier(model, torch.from_numpy(data.images), torch.from_numpy(data.labels), finetune=True, epochs=1)
    assert 0.0 <= res["train_accuracy"] <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(enc0, model.encoder.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(dec0, model.decoder.parameters()))


def test_fit_vae_resumes_like_the_uninterrupted_run(tmp_path):
    x = torch.from_numpy(make_synthetic_cxr(12, size=32, seed=2).images)
    cfg = replace(TINY, batch_size=8, epochs=3)

    def run(folder, epochs, resume=False):
        torch.manual_seed(0)
        model = PumaMedNet(cfg)
        hist = fit_vae(model, x, epochs=epochs, checkpoint_dir=folder, resume=resume)
        return model, hist

    full, h_full = run(tmp_path / "full", 3)
    run(tmp_path / "part", 2)
    part, h_part = run(tmp_path / "part", 3, resume=True)  # 2 epochs from the checkpoint, then 1 more
    assert [h["epoch"] for h in h_part] == [1, 2, 3]
    assert h_part[-1]["loss"] == pytest.approx(h_full[-1]["loss"], rel=1e-6)
    for (k, a), b in zip(full.state_dict().items(), part.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        fit_vae(PumaMedNet(cfg), x, epochs=1, checkpoint_dir=tmp_path / "full")
    with pytest.raises(ValueError, match=r"another configuration .*beta: 4\.0 vs 1\.0"):
        fit_vae(PumaMedNet(replace(cfg, beta=1.0)), x, checkpoint_dir=tmp_path / "full", resume=True)


# --------------------------------------------------------------------------------- explanations
@pytest.mark.parametrize("channels", [1, 3])
def test_traversal_grid_shapes(channels, tmp_path):
    cfg = replace(TINY, in_channels=channels)
    model = PumaMedNet(cfg).eval()
    x = torch.rand(5, channels, 32, 32) * 2 - 1
    t = latent_traversal(model, x[0], [3, 0], n_steps=5)
    assert t.shape == (2, 5, channels, 32, 32)
    assert latent_traversal(model, x[0], n_steps=4).shape == (cfg.latent_dim, 4, channels, 32, 32)
    # along axis 3 only that latent moves: decoding the endpoints by hand gives the same images
    mu = model.encode(x[:1])[0]
    z = mu.repeat(2, 1)
    z[:, 3] = torch.tensor([-3.0, 3.0])
    torch.testing.assert_close(t[0, [0, -1]], model.decode(z))
    with pytest.raises(ValueError, match="out of range"):
        latent_traversal(model, x[0], [cfg.latent_dim])
    fit_classifier(model, x, torch.tensor([0, 1, 0, 1, 0]), epochs=2)
    res = pm.explain(model, x, tmp_path, n_images=3, n_steps=5, top_k=2)
    f = res["upscale"]
    side = 32 * f + 2
    with Image.open(tmp_path / "traversals.png") as im:
        assert im.size == (5 * side + 2, 2 * side + 2)
    with Image.open(tmp_path / "reconstructions.png") as im:
        assert im.size == (3 * side + 2, 3 * side + 2)
    for name in res["files"]:
        assert (tmp_path / name).stat().st_size > 0


# ----------------------------------------------------------------------------- shortcut audit
def _trained(shortcut: float, seed: int = 0):
    cfg = replace(TINY, seed=seed)
    tr = make_synthetic_cxr(320, size=32, shortcut=shortcut, seed=seed)
    te = make_synthetic_cxr(256, size=32, shortcut=0.0, seed=1000 + seed)
    torch.manual_seed(seed)
    model = PumaMedNet(cfg, tr.classes)
    fit_vae(model, torch.from_numpy(tr.images))
    fit_classifier(model, torch.from_numpy(tr.images), torch.from_numpy(tr.labels))
    rng = np.random.default_rng(seed)
    rep = bias_audit(model, torch.from_numpy(te.images), torch.from_numpy(te.labels),
                     attributes={"marker": te.marker, "scanner": te.scanner, "age": rng.normal(50, 10, 256)})
    return model, te, rep


@pytest.fixture(scope="module")
def with_shortcut():
    return _trained(1.0)


@pytest.fixture(scope="module")
def without_shortcut():
    return _trained(0.0)


def _marker_cell(te) -> str:
    y0, y1, x0, x1 = te.marker_region
    return next(k for k, (a, b, c, d) in pm.grid_regions(32, 4).items() if a <= y0 and y1 <= b and c <= x0 and x1 <= d)


# Margins measured over seeds 0-3 (tiny preset, 320 training images): with the shortcut the marker
# cell and attribute flip 100% of decisions and every other cell 0%; without it the marker cell ranks
# 9th-14th of 16 (flip 0.05-0.16 vs 0.34-0.44 for the top lung cell) and the marker attribute <= 0.20.
def test_audit_ranks_the_planted_shortcut_first(with_shortcut):
    _, te, rep = with_shortcut
    regions = [it for it in rep.items if it.kind == "region"]
    attrs = [it for it in rep.items if it.kind == "attribute"]
    assert regions[0].name == _marker_cell(te)
    assert regions[0].score >= 0.5 and regions[0].score - regions[1].score >= 0.3
    assert attrs[0].name == "marker" and attrs[0].score >= 0.5
    assert {"marker", _marker_cell(te)} <= set(rep.flagged)
    age = next(it for it in attrs if it.name == "age")
    assert "median" in age.detail["note"]


def test_audit_does_not_rank_the_marker_first_without_shortcut(with_shortcut, without_shortcut):
    _, te, rep = without_shortcut
    regions = [it for it in rep.items if it.kind == "region"]
    assert regions[0].name != _marker_cell(te)
    sc = {it.name: it.score for it in rep.items}
    assert sc[_marker_cell(te)] < regions[0].score - 0.1
    assert sc["marker"] < 0.3
    assert sc["marker"] < {it.name: it.score for it in with_shortcut[2].items}["marker"] - 0.5


def test_audit_plot_and_explicit_region(with_shortcut, tmp_path):
    model, te, _ = with_shortcut
    x, y = torch.from_numpy(te.images[:64]), torch.from_numpy(te.labels[:64])
    rep = bias_audit(model, x, y, regions={"corner": te.marker_region}, grid=None)
    assert rep.ranking == ["corner"]
    pm.plot_audit(rep, tmp_path / "a.png", image=x.mean(0))
    assert Image.open(tmp_path / "a.png").size[0] > 100
    with pytest.raises(ValueError, match="region 'bad'"):
        bias_audit(model, x, y, regions={"bad": (0, 40, 0, 4)})
    with pytest.raises(ValueError, match="attribute 'const'"):
        bias_audit(model, x, y, attributes={"const": np.zeros(64)})
    with pytest.raises(ValueError, match="two classes"):
        bias_audit(model, x, torch.zeros(64, dtype=torch.long))


# ---------------------------------------------------------------------------------- persistence
def test_save_load_round_trip(tmp_path, with_shortcut):
    model, te, _ = with_shortcut
    model.save(tmp_path / "m")
    loaded = PumaMedNet.load(tmp_path / "m")
    assert loaded.cfg == model.cfg and loaded.classes == model.classes
    x = torch.from_numpy(te.images[:16])
    with torch.no_grad():
        assert torch.equal(loaded.logits(x), model.logits(x))
        assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
        assert torch.equal(loaded.attention_weights(x), model.attention_weights(x))
    assert not list((tmp_path / "m").glob(".*tmp"))  # atomic writes leave no temp files
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        PumaMedNet.load(tmp_path / "m")


# ---------------------------------------------------------------------------------- bad input
def test_config_validation_and_input_checks():
    with pytest.raises(ValueError, match="divisible"):
        PumaMedNetConfig(image_size=36, widths=(8, 16, 32))
    with pytest.raises(ValueError, match="in_channels"):
        PumaMedNetConfig(in_channels=2)
    with pytest.raises(ValueError, match="attention_floor"):
        PumaMedNetConfig(attention_floor=1.5)
    with pytest.raises(ValueError, match="unknown"):
        PumaMedNetConfig.from_dict({**TINY.to_dict(), "depth": 3})
    assert PumaMedNetConfig.from_dict(TINY.to_dict()) == TINY
    model = PumaMedNet(TINY)
    with pytest.raises(ValueError, match=r"images must have shape \(batch, 1, 32, 32\)"):
        model.encode(torch.zeros(2, 1, 64, 64))
    with pytest.raises(ValueError, match="labels must be in"):
        fit_classifier(model, torch.zeros(2, 1, 32, 32), torch.tensor([0, 2]))


def _png(path: Path, size: tuple[int, int], value: int = 128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)


def test_folder_mixed_sizes_unreadable_files_dicom_and_empty_class(tmp_path):
    from pydicom.data import get_testdata_file

    root = tmp_path / "data"
    _png(root / "a" / "1.png", (32, 32))
    _png(root / "a" / "2.png", (48, 40))
    _png(root / "b" / "3.png", (64, 64), 30)
    (root / "b" / "broken.png").write_bytes(b"not a png")
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "b" / "ct.dcm")
    with pytest.warns(UserWarning) as rec:
        folder = pm.load_images(root, size=32)
    msgs = " | ".join(str(w.message) for w in rec)
    assert "resized to 32x32" in msgs and "40x48 (1)" in msgs and "broken.png" in msgs
    assert folder.images.shape == (4, 1, 32, 32)
    assert folder.labels.tolist() == [0, 0, 1, 1]
    assert [p.name for p, _ in folder.skipped] == ["broken.png"]
    (root / "c").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) with no image files under .*: c$"):
        pm.load_images(root, size=32)
    flat = tmp_path / "flat"
    _png(flat / "1.png", (32, 32))
    with pytest.raises(ValueError, match="one sub-folder per class"):
        pm.load_images(flat, size=32)


# ----------------------------------------------------------------------------------------- CLI
def test_cli_demo_train_explain_audit_and_refusal(tmp_path, capsys):
    from biogen.cli import build_parser, main

    out = tmp_path / "demo"
    args = ["pumamednet", "demo", "--out", str(out), "--preset", "tiny", "--n-train", "64", "--n-test", "48",
            "--epochs", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
        for sub in ("train/model/model.safetensors", "train/history.json", "explain/traversals.png",
                    "explain/attention.png", "audit/audit.json", "audit/audit.png", "verdict.json",
                    "data/test/metadata.csv"):
            assert (out / sub).is_file(), sub
        assert main(args) == 2  # non-empty output folder
        assert "--overwrite" in capsys.readouterr().err
        data, model = out / "data" / "test", out / "train" / "model"
        assert main(["pumamednet", "audit", "--model", str(model), "--data", str(data), "--out",
                     str(tmp_path / "audit"), "--metadata", str(data / "metadata.csv"), "--attribute", "marker",
                     "--region", "corner=0:8,0:8", "--grid", "0"]) == 0
        assert main(["pumamednet", "audit", "--model", str(model), "--data", str(data), "--out",
                     str(tmp_path / "audit2"), "--region", "corner=0-8"]) == 2
        assert main(["pumamednet", "train", "--data", str(data), "--out", str(tmp_path / "tr"), "--preset", "tiny",
                     "--epochs", "1", "--clf-epochs", "5", "--no-attention"]) == 0
        assert main(["pumamednet", "explain", "--model", str(tmp_path / "tr" / "model"), "--data", str(data),
                     "--out", str(tmp_path / "ex"), "--n-images", "2"]) == 0
    import json

    rep = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert sorted(rep["ranking"]) == ["corner", "marker"]
    # every option of every pumamednet action has help text
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["pumamednet"]
    actions = next(a for a in sub._actions if a.dest == "pumamednet_command").choices
    assert set(actions) == {"train", "explain", "audit", "demo"}
    for name, p in actions.items():
        for a in p._actions:
            if a.dest != "help":
                assert a.help, f"{name} {a.option_strings} has no help"
