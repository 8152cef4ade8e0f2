"""PumaMedNet explanations: latent traversals, the classifier's latent directions, attention overlays."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .network import PumaMedNet, corrupt


# --------------------------------------------------------------------------------- explainability
@torch.no_grad()
def latent_traversal(model: PumaMedNet, image: torch.Tensor, dims: Optional[Sequence[int]] = None, *,
                     n_steps: int = 7, span: float = 3.0) -> torch.Tensor:
    """Decode the latent mean of ``image`` with one latent moved along [-span, span].

    image: (c, s, s) or (1, c, s, s); dims: latent axes (default all) ->
    (len(dims), n_steps, c, s, s).
    """
    if image.ndim == 3:
        image = image[None]
    if image.shape[0] != 1:
        raise ValueError(f"image must be a single image (c, s, s), got {tuple(image.shape)}")
    if n_steps < 2:
        raise ValueError(f"n_steps must be >= 2, got {n_steps}")
    L = model.cfg.latent_dim
    dims = list(range(L)) if dims is None else [int(d) for d in dims]
    bad = [d for d in dims if not 0 <= d < L]
    if bad:
        raise ValueError(f"dims {bad} out of range for latent_dim {L}")
    mu = model.encode(image)[0][0]
    vals = torch.linspace(-span, span, n_steps, device=mu.device)
    z = mu.repeat(len(dims), n_steps, 1)
    for i, d in enumerate(dims):
        z[i, :, d] = vals
    out = model.decoder(z.reshape(-1, L))
    return out.reshape(len(dims), n_steps, *out.shape[1:])


def _margin_grad(model: PumaMedNet, mu: torch.Tensor) -> torch.Tensor:
    """d(top logit - runner-up logit)/d mu per sample: (n, latent), the local decision direction."""
    mu = mu.detach().requires_grad_(True)
    with torch.enable_grad():
        lg = model.classifier(mu)
        top2 = lg.topk(2, -1).indices
        margin = lg.gather(1, top2[:, :1]) - lg.gather(1, top2[:, 1:2])
        (g,) = torch.autograd.grad(margin.sum(), mu)
    return g


def _contrast_grad(model: PumaMedNet, mu: torch.Tensor, hi: int = 1, lo: int = 0) -> torch.Tensor:
    """d(logit[hi] - logit[lo])/d mu per sample: (n, latent); one sign for all samples, unlike the margin."""
    mu = mu.detach().requires_grad_(True)
    with torch.enable_grad():
        lg = model.classifier(mu)
        (g,) = torch.autograd.grad((lg[:, hi] - lg[:, lo]).sum(), mu)
    return g


def classifier_directions(model: PumaMedNet, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Latent axes ranked by how much the classifier's decision uses them.

    Importance of axis j = mean |d margin / d mu_j| * std(mu_j) over the images (for a linear head,
    |weight difference| times the axis's spread). Returns (dims sorted, importance of each), both (latent,).
    """
    mu = model.latent_mean(images)
    imp = (_margin_grad(model, mu).abs().mean(0) * mu.std(0)).cpu().numpy()
    order = np.argsort(-imp)
    return order, imp[order]


def _overlay(images: torch.Tensor, maps: torch.Tensor) -> np.ndarray:
    """Images (n, c, s, s) in [-1, 1] with maps (n, 1, s, s) as a colour overlay -> (n, 3, s, s) in [-1, 1]."""
    from matplotlib import colormaps

    g = ((images.mean(1) + 1) / 2).clamp(0, 1).cpu().numpy()
    m = maps[:, 0].cpu().numpy()
    m = (m - m.min(axis=(1, 2), keepdims=True)) / np.ptp(m, axis=(1, 2), keepdims=True).clip(1e-8)
    rgb = colormaps["inferno"](m)[..., :3]
    out = 0.5 * g[..., None] + 0.5 * rgb
    return out.transpose(0, 3, 1, 2) * 2 - 1


def _up(x, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling (n, c, s, s) so that small images stay legible in the PNG grids."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach().cpu())
    return (x if factor == 1 else x.repeat_interleave(factor, -1).repeat_interleave(factor, -2)).numpy()


def explain(model: PumaMedNet, images: torch.Tensor, out_dir: str | Path, *, n_images: int = 8,
            n_steps: int = 7, top_k: int = 6, gen: Optional[torch.Generator] = None) -> dict:
    """Write explanation PNG grids into ``out_dir`` and return what they show.

    - ``reconstructions.png``: rows of (clean, corrupted, reconstruction of the corrupted).
    - ``traversals.png``: the ``top_k`` latent axes most used by the classifier, one row each.
    - ``classifier_direction.png``: up to 4 images moved along the classifier's mean direction from
      class 0 to class 1 (the gradient of ``logit[1] - logit[0]``), one row each.
    - ``attention.png``: input images and their attention weight maps.

    Images smaller than 128 px are upscaled (nearest neighbour) by ``128 // image_size`` in the grids.
    """
    from ...data.images import save_grid

    model.check_images(images)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    f = max(1, 128 // model.cfg.image_size)
    model.eval()
    gen = gen or torch.Generator().manual_seed(model.cfg.seed + 2)
    x = images[:n_images]
    with torch.no_grad():
        pair = corrupt(x, replace(model.cfg, rotate_deg=0.0, p_hflip=0.0, p_vflip=0.0, perspective=0.0), gen)
        rec = model.reconstruct(pair.inputs)
    rows = torch.stack([x, pair.inputs, rec], 1).reshape(-1, *x.shape[1:])
    save_grid(_up(rows, f), out / "reconstructions.png", nrow=3)
    dims, imp = classifier_directions(model, images)
    k = min(top_k, model.cfg.latent_dim)
    trav = latent_traversal(model, images[0], dims[:k], n_steps=n_steps)
    save_grid(_up(trav.reshape(-1, *trav.shape[2:]), f), out / "traversals.png", nrow=n_steps)
    with torch.no_grad():
        mu = model.latent_mean(images)
        d = _contrast_grad(model, mu).mean(0)
        d = d / d.norm().clamp_min(1e-8)
        proj = (mu - mu.mean(0)) @ d
        t = torch.linspace(float(proj.min()), float(proj.max()), n_steps, device=mu.device)
        base = mu[:min(4, len(mu))]
        z = base[:, None, :] + (t[None, :, None] - (base @ d)[:, None, None]) * d
        dir_imgs = model.decoder(z.reshape(-1, z.shape[-1]))
        dir_pred = model.classifier(z.reshape(-1, z.shape[-1])).argmax(-1).reshape(len(base), n_steps)
        att = model.attention_weights(x)
    save_grid(_up(dir_imgs, f), out / "classifier_direction.png", nrow=n_steps)
    att_rows = np.concatenate([x.cpu().numpy().repeat(3 // x.shape[1], 1) if x.shape[1] == 1 else x.cpu().numpy(),
                               _overlay(x, att)], 0)
    save_grid(_up(att_rows, f), out / "attention.png", nrow=len(x))
    return {
        "top_latent_dims": [int(v) for v in dims[:k]],
        "importance": [float(v) for v in imp[:k]],
        "classifier_direction_predictions": [[model.classes[int(c)] for c in row] for row in dir_pred.cpu()],
        "attention_max_over_mean": [float(a.max()) for a in att],
        "upscale": f,
        "files": ["reconstructions.png", "traversals.png", "classifier_direction.png", "attention.png"],
    }
