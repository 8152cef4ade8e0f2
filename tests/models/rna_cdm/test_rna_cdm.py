import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from biogen.data.paired import load_paired
from biogen.data.toy_tissue import ToyTissueConfig, simulate_toy_tissue
from biogen.models.rna_cdm.cascade import (
    CascadeTrainConfig,
    RNACDM,
    cascade_preset,
    train_cascade,
)
from biogen.models.rna_cdm.vae import RNAEncoder, RNAVAE, RNAVAEConfig, VAETrainConfig, kl_divergence

ROOT = Path(__file__).resolve().parents[3]
LATENT = 8


@pytest.fixture(scope="module")
def toy():
    return simulate_toy_tissue(36, 2, ToyTissueConfig(n_genes=120, markers_per_type=10, tile_size=32), seed=3)


@pytest.fixture(scope="module")
def encoder(toy):
    enc, hist = RNAEncoder.fit(toy.adata, RNAVAEConfig(n_genes=120, hidden=(64, 32), latent_dim=LATENT),
                               VAETrainConfig(epochs=60, batch_size=16, lr=3e-3, warmup_epochs=3, patience=60))
    return enc, hist


@pytest.fixture(scope="module")
def cdm():
    torch.manual_seed(0)
    m = RNACDM(cascade_preset("tiny", LATENT))
    # the UNets start as the identity with a zero output layer; jitter every weight so that outputs
    # depend on the input, the condition and the null embedding
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


# ----------------------------------------------------------------------------------------- VAE


def test_kl_matches_torch_distributions():
    mu = torch.randn(7, 5, dtype=torch.float64)
    logvar = torch.randn(7, 5, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    ref = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(kl_divergence(mu, logvar), ref)


def test_vae_loss_terms_vs_independent_formula():
    torch.manual_seed(1)
    m = RNAVAE(RNAVAEConfig(n_genes=20, hidden=(16, 8), latent_dim=4, beta=0.3)).eval()
    x = torch.randn(6, 20)
    out = m.loss(x)
    recon, mu, logvar = (t.detach().double().numpy() for t in m(x))
    mse = ((recon - x.double().numpy()) ** 2).mean()
    var = np.exp(logvar)
    kl = np.mean([0.5 * np.sum(mu[i] ** 2 + var[i] - 1 - logvar[i]) for i in range(6)])
    np.testing.assert_allclose(float(out["mse"].detach()), mse, rtol=1e-5)
    np.testing.assert_allclose(float(out["kl"].detach()), kl, rtol=1e-5)
    np.testing.assert_allclose(float(out["loss"].detach()), mse + 0.3 * kl, rtol=1e-5)


def test_vae_layers_have_batchnorm_and_leaky_relu():
    m = RNAVAE(RNAVAEConfig(n_genes=30))
    kinds = [type(l).__name__ for l in m.encoder]
    assert kinds == ["Linear", "BatchNorm1d", "LeakyReLU"] * 2
    assert m.encoder[0].out_features == 6000 and m.encoder[3].out_features == 4000 and m.mu.out_features == 200
    assert m.config.beta == 0.005


def test_vae_round_trip_and_training(encoder, toy):
    enc, hist = encoder
    assert hist.best_epoch >= 0 and hist.val_loss[hist.best_epoch] == min(hist.val_loss)
    assert min(hist.val_loss) < hist.val_loss[0]
    X = np.asarray(toy.adata.X)
    z = enc.encode(toy.adata)
    assert z.shape == (36, LATENT)
    rec = enc.decode(z)
    assert rec.shape == X.shape
    # reconstruction beats predicting the training mean (variance explained > 0) on held-out samples
    te = hist.split["test"]
    err = ((rec[te] - X[te]) ** 2).mean()
    base = ((enc.mean - X[te]) ** 2).mean()
    assert err < 0.8 * base, (err, base)


def test_zscore_fitted_on_train_split_saved_and_reused(encoder, toy, tmp_path):
    enc, hist = encoder
    X = np.asarray(toy.adata.X)
    tr = hist.split["train"]
    assert sorted(tr + hist.split["val"] + hist.split["test"]) == list(range(36))
    np.testing.assert_allclose(enc.mean, X[tr].mean(0), rtol=1e-5, atol=1e-6)
    sd = X[tr].std(0)
    np.testing.assert_allclose(enc.std, np.where(sd < 1e-6, 1, sd), rtol=1e-5, atol=1e-6)
    path = enc.save(tmp_path / "vae.safetensors")
    enc2 = RNAEncoder.load(path)
    np.testing.assert_array_equal(enc2.mean, enc.mean)
    np.testing.assert_array_equal(enc2.std, enc.std)
    # new data is scaled with the saved statistics, not its own
    X2 = X[:5] + 1.0
    with torch.no_grad():
        ref = enc.module.encode(torch.from_numpy(((X2 - enc.mean) / enc.std).astype(np.float32)))[0].numpy()
    np.testing.assert_allclose(enc2.encode(X2), ref, rtol=1e-5, atol=1e-5)
    # columns are matched by gene name, not position
    perm = np.random.default_rng(0).permutation(X.shape[1])
    genes = np.asarray(enc.genes)[perm]
    np.testing.assert_allclose(enc2.encode(X2[:, perm], genes=genes), ref, rtol=1e-5, atol=1e-5)
    adata = toy.adata.copy()
    enc2.export_latents(adata, "X_test")
    np.testing.assert_allclose(adata.obsm["X_test"], enc.encode(toy.adata), rtol=1e-5, atol=1e-6)


def test_vae_resumes_like_the_uninterrupted_run(toy, tmp_path):
    cfg = RNAVAEConfig(n_genes=120, hidden=(32, 16), latent_dim=LATENT)

    tc = VAETrainConfig(epochs=6, batch_size=16, lr=3e-3, warmup_epochs=1, patience=3)
    full, h_full = RNAEncoder.fit(toy.adata, cfg, tc, checkpoint_dir=tmp_path / "full")

    class Crash(Exception):
        pass

    def crash_in_epoch_4(msg):
        if msg.startswith("epoch 4/"):
            raise Crash  # before epoch 4's checkpoint: the folder holds epoch 3's

    with pytest.raises(Crash):
        RNAEncoder.fit(toy.adata, cfg, tc, log=crash_in_epoch_4, checkpoint_dir=tmp_path / "part")
    part, h_part = RNAEncoder.fit(toy.adata, cfg, tc, checkpoint_dir=tmp_path / "part", resume=True)
    assert len(h_part.val_loss) == len(h_full.val_loss) > 3
    assert h_part.val_loss == pytest.approx(h_full.val_loss, rel=1e-6)
    assert (h_part.best_epoch, h_part.stopped_early) == (h_full.best_epoch, h_full.stopped_early)
    for (k, a), b in zip(full.module.state_dict().items(), part.module.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    with pytest.raises(ValueError, match=r"another configuration"):
        RNAEncoder.fit(toy.adata, RNAVAEConfig(n_genes=120, hidden=(32, 8), latent_dim=LATENT),
                       VAETrainConfig(epochs=6, batch_size=16, warmup_epochs=1, patience=2),
                       checkpoint_dir=tmp_path / "full", resume=True)


def test_vae_bad_input(encoder, toy):
    enc, _ = encoder
    X = np.asarray(toy.adata.X).copy()
    X[2, 5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        enc.encode(X)
    with pytest.raises(ValueError, match="unknown to this model"):
        enc.encode(np.zeros((2, 121)), genes=enc.genes + ["NOT_A_GENE"])
    with pytest.raises(ValueError, match="missing"):
        enc.encode(np.zeros((2, 119)), genes=enc.genes[:-1])
    with pytest.raises(ValueError, match="latent_dim"):
        RNAVAEConfig(n_genes=5, latent_dim=0)


# ----------------------------------------------------------------------------------------- cascade


def test_cascade_shapes_per_stage(cdm):
    B = 3
    z = torch.randn(B, LATENT)
    t = torch.randint(0, 1000, (B,))
    base = cdm.predict("base", torch.randn(B, 3, 16, 16), t, z)
    assert base.shape == (B, 3, 16, 16)
    low = cdm.low_res_input(torch.rand(B, 3, 16, 16) * 2 - 1, torch.tensor([0, 10, 200]), torch.randn(B, 3, 16, 16))
    assert low.shape == (B, 4, 32, 32)
    torch.testing.assert_close(low[:, 3], torch.tensor([0, 0.01, 0.2]).view(B, 1, 1).expand(B, 32, 32))
    assert cdm.predict("sr", torch.randn(B, 3, 32, 32), t, z, low).shape == (B, 3, 32, 32)
    assert cdm.cond_tokens("base", z).shape == (B, 2, 16)
    assert cdm.unets["sr"].config.in_channels == 7
    g = torch.Generator().manual_seed(0)
    hi, lo = cdm.sample(z, steps=2, generator=g, return_low_res=True)
    assert hi.shape == (B, 3, 32, 32) and lo.shape == (B, 3, 16, 16)
    assert cdm.sample(z, steps=2, stages=("base",)).shape == (B, 3, 16, 16)
    assert float(hi.abs().max()) <= 1.0


def test_paper_preset_sizes():
    cfg = cascade_preset("paper", 200)
    assert (cfg.base_size, cfg.sr_size) == (64, 256)
    assert cfg.unet_config("base").base_channels == 128 and cfg.unet_config("sr").in_channels == 7
    assert cfg.cond_drop_prob == 0.1


def test_guidance_scale_one_is_conditional_prediction(cdm):
    torch.manual_seed(3)
    z = torch.randn(2, LATENT)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([500, 20])
    with torch.no_grad():
        cond = cdm.predict("base", x, t, z)
        null = cdm.predict("base", x, t, z, cond_drop_mask=torch.ones(2, dtype=torch.bool))
        torch.testing.assert_close(cdm.guided_eps("base", x, t, z, 1.0), cond, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cdm.guided_eps("base", x, t, z, 0.0), null, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cdm.guided_eps("base", x, t, z, 3.0), null + 3 * (cond - null), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(cond, null)  # the null condition is a different input


def test_sampling_is_deterministic_with_a_seed(cdm):
    z = torch.randn(2, LATENT)
    for sched in ("dpmsolver++", "ddim", "ddpm"):
        a = cdm.sample(z, scheduler=sched, steps=3, generator=torch.Generator().manual_seed(5))
        b = cdm.sample(z, scheduler=sched, steps=3, generator=torch.Generator().manual_seed(5))
        c = cdm.sample(z, scheduler=sched, steps=3, generator=torch.Generator().manual_seed(6))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="unknown scheduler"):
        cdm.sample(z, scheduler="euler")


def test_training_lowers_the_loss_both_stages(toy):
    torch.manual_seed(0)
    m = RNACDM(cascade_preset("tiny", LATENT))
    tiles = toy.tiles.reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    z = np.random.default_rng(0).normal(size=(len(tiles), LATENT)).astype(np.float32)
    h = train_cascade(m, tiles, z, CascadeTrainConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=5))
    for s in ("base", "sr"):
        assert np.mean(h[s][-10:]) < 0.8 * np.mean(h[s][:5]), (s, h[s][:5], h[s][-10:])
    torch.testing.assert_close(m.latent_mean, torch.from_numpy(z.mean(0)))
    with pytest.raises(ValueError, match="px"):
        train_cascade(m, tiles[:, :, :24, :24], z, stages=("sr",))
    with pytest.raises(ValueError, match="one latent per tile"):
        train_cascade(m, tiles, z[:3])


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_cascade_resumes_like_the_uninterrupted_run(toy, tmp_path, ema):
    tiles = toy.tiles.reshape(-1, 32, 32, 3).transpose(0, 3, 1, 2).astype(np.float32)[:16] / 127.5 - 1
    z = np.random.default_rng(0).normal(size=(len(tiles), LATENT)).astype(np.float32)
    tc = CascadeTrainConfig(steps=6, batch_size=4, lr=3e-3, warmup_steps=2, ema_decay=ema)

    def fresh():
        torch.manual_seed(0)
        return RNACDM(cascade_preset("tiny", LATENT))

    full = fresh()
    h_full = train_cascade(full, tiles, z, tc, stages=("base",), checkpoint_dir=tmp_path / "full", checkpoint_every=2)

    class Crash(Exception):
        pass

    part = fresh()
    calls = {"n": 0}
    loss = part.loss

    def crash_in_step_4(*a, **k):  # after the checkpoint of step 3 (every 3 steps), before step 4's update
        calls["n"] += 1
        if calls["n"] == 4:
            raise Crash
        return loss(*a, **k)

    part.loss = crash_in_step_4
    with pytest.raises(Crash):
        train_cascade(part, tiles, z, tc, stages=("base",), checkpoint_dir=tmp_path / "part", checkpoint_every=3)
    part = fresh()  # a new process: nothing survives but the checkpoint
    h_part = train_cascade(part, tiles, z, tc, stages=("base",), checkpoint_dir=tmp_path / "part", resume=True,
                           checkpoint_every=3)
    assert h_part["base"] == h_full["base"] and len(h_full["base"]) == 6
    for (k, a), b in zip(full.state_dict().items(), part.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        train_cascade(fresh(), tiles, z, tc, stages=("base",), checkpoint_dir=tmp_path / "full")
    with pytest.raises(ValueError, match="another configuration"):
        train_cascade(fresh(), tiles, z, CascadeTrainConfig(steps=6, batch_size=4, lr=1e-3, warmup_steps=2),
                      stages=("base",), checkpoint_dir=tmp_path / "full", resume=True)


def test_checkpoint_round_trip_and_other_preset(cdm, tmp_path):
    path = cdm.save(tmp_path / "c.safetensors")
    m2 = RNACDM.load(path, preset="tiny")
    z = torch.randn(2, LATENT)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    torch.testing.assert_close(cdm.sample(z, steps=2, generator=g()), m2.sample(z, steps=2, generator=g()))
    with pytest.raises(ValueError, match="c.safetensors: holds preset 'tiny', not the requested 'cpu'"):
        RNACDM.load(path, preset="cpu")
    other = RNACDM(cascade_preset("cpu", LATENT))
    with pytest.raises(ValueError, match="another preset"):
        other.load_checked(cdm.state_dict(), source="tiny weights")
    with pytest.raises(ValueError, match="v.safetensors: is not a RNA-CDM checkpoint .*biogen.rna_vae"):
        RNACDM.load(RNAEncoder(RNAVAE(RNAVAEConfig(3, hidden=(2,), latent_dim=1)), list("abc"),
                               np.zeros(3), np.ones(3)).save(tmp_path / "v.safetensors"))


def test_cascade_bad_input(cdm):
    with pytest.raises(ValueError, match="latent_dim=8"):
        cdm.sample(torch.randn(2, 5), steps=2)
    with pytest.raises(ValueError, match="NaN"):
        cdm.sample(torch.full((1, LATENT), float("nan")), steps=2)
    with pytest.raises(ValueError, match="needs low_res"):
        cdm.predict("sr", torch.randn(1, 3, 32, 32), torch.tensor([1]), torch.randn(1, LATENT))
    with pytest.raises(ValueError, match="unknown RNA-CDM preset"):
        cascade_preset("huge", 8)
    with pytest.raises(ValueError, match="multiple of base_size"):
        cascade_preset("tiny", 8, sr_size=24)


# ----------------------------------------------------------------------------------------- data


@pytest.fixture()
def written(toy, tmp_path):
    # rows shuffled before writing: pairing must go by sample id, not by position
    order = np.random.default_rng(0).permutation(toy.adata.n_obs)
    adata = toy.adata[order].copy()
    adata.write_h5ad(tmp_path / "rna.h5ad")
    toy.write(tmp_path / "unused.h5ad", tmp_path / "tiles")
    return tmp_path


def test_loader_pairs_tiles_with_their_sample(toy, written):
    p = load_paired(written / "rna.h5ad", written / "tiles")
    assert p.tiles.shape == (72, 3, 32, 32)
    ids = toy.sample_ids
    for k in range(0, 72, 7):
        sid = p.sample_ids[p.sample_index[k]]
        assert Path(p.paths[k]).parent.name == sid
        j = int(Path(p.paths[k]).stem.split("_")[1])
        expect = toy.tiles[ids.index(sid), j].transpose(2, 0, 1) / 127.5 - 1
        np.testing.assert_allclose(p.tiles[k], expect, atol=1e-6)
    # the RNA row of each tile is its sample's
    np.testing.assert_array_equal(np.asarray(p.adata.X)[p.sample_index[0]],
                                  np.asarray(toy.adata.X)[ids.index(p.sample_ids[p.sample_index[0]])])


def test_loader_errors(toy, written):
    import shutil

    (written / "tiles" / "S9999").mkdir()
    with pytest.raises(ValueError, match="without an RNA sample.*S9999"):
        load_paired(written / "rna.h5ad", written / "tiles")
    p = load_paired(written / "rna.h5ad", written / "tiles", allow_unmatched=True)
    assert len(p.sample_ids) == 36
    (written / "tiles" / "S9999").rmdir()
    shutil.rmtree(written / "tiles" / "S0004")
    with pytest.raises(ValueError, match="without a tile folder.*S0004"):
        load_paired(written / "rna.h5ad", written / "tiles")
    assert len(load_paired(written / "rna.h5ad", written / "tiles", allow_unmatched=True).sample_ids) == 35
    (written / "tiles" / "S0004").mkdir()
    with pytest.raises(ValueError, match="has no PNG/JPEG tile"):
        load_paired(written / "rna.h5ad", written / "tiles")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(written / "tiles" / "S0004" / "a.png")
    with pytest.raises(ValueError, match="mixed sizes"):
        load_paired(written / "rna.h5ad", written / "tiles")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(written / "tiles" / "S0004" / "a.png")
    with pytest.raises(ValueError, match="mixed colour modes"):
        load_paired(written / "rna.h5ad", written / "tiles")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(written / "tiles" / "S0004" / "a.png")
    adata = toy.adata.copy()
    adata.X[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        load_paired(adata, written / "tiles")
    with pytest.raises(FileNotFoundError):
        load_paired(toy.adata, written / "nope")


# ----------------------------------------------------------------------------------------- CLI


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _cli(*args, check=True):
    """Run ``biogen rnacdm ...`` in-process (a subprocess per call costs seconds of imports)."""
    import contextlib
    import io

    from biogen.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["rnacdm", *args])
        except SystemExit as e:  # argparse --help / usage errors
            code = e.code
    r = _Result(code, out.getvalue(), err.getvalue())
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_cli_entry_point_runs():
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "biogen.cli", "rnacdm", "demo", "--help"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0 and "--minutes" in r.stdout


def test_cli_end_to_end_tiny(toy, tmp_path):
    toy.write(tmp_path / "rna.h5ad", tmp_path / "tiles")
    _cli("train-vae", "--rna", str(tmp_path / "rna.h5ad"), "--out", str(tmp_path / "vae"), "--hidden", "32", "16",
         "--latent", "8", "--epochs", "5", "--batch-size", "16", "--plot", "pca")
    assert (tmp_path / "vae" / "latents_pca.png").exists() and (tmp_path / "vae" / "latents.h5ad").exists()
    vae = str(tmp_path / "vae" / "vae.safetensors")
    _cli("train", "--rna", str(tmp_path / "rna.h5ad"), "--tiles", str(tmp_path / "tiles"), "--vae", vae,
         "--preset", "tiny", "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "cdm"))
    model = str(tmp_path / "cdm" / "cascade.safetensors")
    _cli("sample", "--model", model, "--vae", vae, "--rna", str(tmp_path / "rna.h5ad"), "--samples", "S0001",
         "S0002", "--per-sample", "2", "--steps", "2", "--out", str(tmp_path / "gen"))
    assert len(list((tmp_path / "gen").rglob("generated_*.png"))) == 4
    # refuses a non-empty output folder, and a checkpoint of another preset
    r = _cli("sample", "--model", model, "--vae", vae, "--rna", str(tmp_path / "rna.h5ad"), "--out",
             str(tmp_path / "gen"), check=False)
    assert r.returncode == 2 and "not empty" in r.stderr
    r = _cli("sample", "--model", model, "--vae", vae, "--rna", str(tmp_path / "rna.h5ad"), "--preset", "cpu",
             "--out", str(tmp_path / "gen2"), check=False)
    assert r.returncode == 2 and "holds preset 'tiny'" in r.stderr
    _cli("evaluate", "--model", model, "--vae", vae, "--rna", str(tmp_path / "rna.h5ad"), "--tiles",
         str(tmp_path / "tiles"), "--steps", "2", "--per-sample", "1", "--out", str(tmp_path / "ev"))
    import json

    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["generated_tiles"] == 36 and "fid" in m["fid_kid"] and "within_type_r" in m["composition_fidelity"]


def test_cli_help():
    for sub in ("train-vae", "train", "sample", "evaluate", "demo"):
        r = _cli(sub, "--help")
        assert "--out" in r.stdout and "--overwrite" in r.stdout


@pytest.mark.parametrize("scheduler", ["dpmsolver++", "ddim"])
def test_sampler_with_an_oracle_v_model_returns_the_clean_tile(scheduler):
    """The cascade's scheduler settings (cosine, v target, clipping) are self-consistent: a network that
    outputs the exact v = alpha eps - sigma x0 of a known x0 samples that x0 back in 25 steps."""
    from biogen.diffusion import sample

    m = RNACDM(cascade_preset("tiny", 4))
    assert m.config.prediction_type == "v_prediction"
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    acp = m.train_scheduler.alphas_cumprod.double()

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, cond=None, cond_drop_mask=None):
            a = acp[t].sqrt().view(-1, 1, 1, 1)
            s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
            eps = (x.double() - a * x0.double()) / s
            return (a * eps - s * x0.double()).float()

    out = sample(Oracle(), m.make_scheduler(scheduler), (2, 3, 16, 16), steps=25,
                 generator=torch.Generator().manual_seed(0), progress=False)
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
