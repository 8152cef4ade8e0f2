import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from biogen.data.phantoms import brain_phantoms
from biogen.models.tumorsynth import (
    Discriminator,
    Generator1,
    Generator2,
    TumorSynthConfig,
    build_models,
    count_parameters,
    load_generator,
    sample,
    train,
)


def _count_from_layer_list(layers):
    """Parameter count of a Keras layer list, computed by hand: (kind, in, out, kernel)."""
    total = 0
    for kind, cin, cout, k in layers:
        total += cin * cout * (k * k if kind != "dense" else 1) + cout
    return total


D_LAYERS = [("conv", 1, 64, 3), ("conv", 64, 128, 3), ("conv", 128, 128, 3), ("conv", 128, 256, 3),
            ("dense", 256 * 16 * 16, 1, 1)]
G1_LAYERS = [("dense", 100, 32 * 32 * 256, 1), ("convT", 256, 128, 4), ("convT", 128, 128, 4), ("conv", 128, 1, 4)]
G2_LAYERS = [("dense", 100, 128 * 128 * 256, 1), ("conv", 256, 512, 3), ("conv", 512, 256, 3), ("conv", 256, 128, 3),
             ("convT", 128, 128, 2), ("convT", 128, 256, 2), ("convT", 256, 512, 2), ("conv", 512, 1, 4)]


def test_parameter_counts_match_the_slides():
    D = Discriminator()
    G1 = Generator1()
    assert count_parameters(G1) + count_parameters(D) == 27_848_066
    assert count_parameters(D) == _count_from_layer_list(D_LAYERS)
    with torch.device("meta"):  # 427M parameters: count without allocating 1.7 GB
        G2 = Generator2()
    assert count_parameters(G2) == _count_from_layer_list(G2_LAYERS)
    assert count_parameters(G2) + count_parameters(D) == 427_592_578


def test_shapes_and_ranges():
    G, D = build_models(TumorSynthConfig())
    x = G(torch.randn(3, 100) * 5)
    assert x.shape == (3, 1, 128, 128)
    assert x.min() >= -1 and x.max() <= 1
    assert D(x).shape == (3, 1)
    with torch.device("meta"):
        G2 = Generator2()
        assert G2(torch.randn(2, 100)).shape == (2, 1, 128, 128)
    with pytest.raises(ValueError, match=r"z must have shape \(batch, 100\)"):
        G(torch.randn(3, 64))


def test_conditional_models_need_labels():
    G, D = build_models(TumorSynthConfig(image_size=32, conditional=True))
    z = torch.randn(2, 100)
    with pytest.raises(ValueError, match="conditional"):
        G(z)
    x = G(z, torch.tensor([0, 1]))
    assert D(x, torch.tensor([0, 1])).shape == (2, 1)


def test_config_validation():
    with pytest.raises(ValueError, match="generator must be"):
        TumorSynthConfig(generator="g3")
    with pytest.raises(ValueError, match="multiple of 8"):
        TumorSynthConfig(image_size=100)


@pytest.fixture(scope="module")
def phantoms():
    return brain_phantoms(40, size=32, seed=0)


CFG = dict(image_size=32, epochs=2, n_eval_samples=16, batch_size=4)


def test_training_moves_both_losses_and_writes_outputs(tmp_path, phantoms):
    images, labels = phantoms
    config = TumorSynthConfig(**CFG)
    G0, D0 = build_models(config)  # the same seed as train() uses: the starting weights
    res = train(images, labels, config=config, out_dir=tmp_path / "run", progress=False)
    assert len(res.history) == 2
    G, _ = load_generator(tmp_path / "run", best=False)
    torch.manual_seed(config.seed)
    G0, D0 = build_models(config)
    moved = [not torch.equal(a, b) for a, b in zip(G.state_dict().values(), G0.state_dict().values())]
    assert all(moved)
    d_last = load_file(str(tmp_path / "run" / "checkpoints" / "last" / "discriminator.safetensors"))
    assert any(not torch.equal(d_last[k], v) for k, v in D0.state_dict().items())
    for h in res.history:
        assert np.isfinite([h.loss_d, h.loss_g, h.kid, h.diversity]).all()
    for name in ("history.json", "history.png", "samples_epoch_000.png", "samples_epoch_001.png",
                 "best_generator.safetensors"):
        assert (tmp_path / "run" / name).is_file()
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert hist["best_epoch"] == int(np.argmin([h["kid"] for h in hist["history"]]))


def test_resume_equals_uninterrupted_training(tmp_path, phantoms):
    images, labels = phantoms
    torch.set_num_threads(1)  # bitwise reproducibility of the two runs
    straight = train(images, labels, config=TumorSynthConfig(**CFG), out_dir=tmp_path / "a", progress=False)
    train(images, labels, config=TumorSynthConfig(**{**CFG, "epochs": 1}), out_dir=tmp_path / "b", progress=False)
    resumed = train(images, labels, config=TumorSynthConfig(**CFG), out_dir=tmp_path / "b", resume=True, progress=False)
    assert [h.epoch for h in resumed.history] == [0, 1]
    a = load_file(str(tmp_path / "a" / "checkpoints" / "last" / "generator.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "last" / "generator.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert straight.history[1].loss_d == pytest.approx(resumed.history[1].loss_d, rel=1e-5)


def test_refuses_to_overwrite_and_other_preset(tmp_path, phantoms):
    images, labels = phantoms
    train(images, labels, config=TumorSynthConfig(**{**CFG, "epochs": 1}), out_dir=tmp_path / "r", progress=False)
    with pytest.raises(FileExistsError, match="not empty"):
        train(images, labels, config=TumorSynthConfig(**CFG), out_dir=tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="another configuration"):
        train(images, labels, config=TumorSynthConfig(**{**CFG, "lr": 1e-3}), out_dir=tmp_path / "r",
              resume=True, progress=False)


def test_bad_input(tmp_path, phantoms):
    images, labels = phantoms
    with pytest.raises(ValueError, match="larger than the training set"):
        train(images[:6], labels[:6], config=TumorSynthConfig(**{**CFG, "batch_size": 8}), out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match=r"shape \(n, 1, 32, 32\)"):
        train(images[:, :, :16], labels, config=TumorSynthConfig(**CFG), out_dir=tmp_path / "y")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        train(images * 3, labels, config=TumorSynthConfig(**CFG), out_dir=tmp_path / "z")


def test_sample_is_seeded():
    G, _ = build_models(TumorSynthConfig(image_size=32))
    assert np.array_equal(sample(G, 4, seed=1), sample(G, 4, seed=1))
    assert not np.array_equal(sample(G, 4, seed=1), sample(G, 4, seed=2))


def test_cli_help_and_sample(tmp_path, phantoms):
    images, labels = phantoms
    train(images, labels, config=TumorSynthConfig(**{**CFG, "epochs": 1}), out_dir=tmp_path / "run", progress=False)
    from biogen.cli import main

    assert main(["tumorsynth", "sample", "--run", str(tmp_path / "run"), "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()
    assert main(["tumorsynth", "sample", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "t.png")]) == 2
    r = subprocess.run([sys.executable, "-m", "biogen.cli", "tumorsynth", "train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--resume" in r.stdout and "--generator" in r.stdout
