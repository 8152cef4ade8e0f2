"""PumaMedNet bias audit: how much the classifier's decision depends on an image region or an attribute."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .explain import _margin_grad
from .network import PumaMedNet
from .training import _check_data


# ------------------------------------------------------------------------------------- bias audit
@dataclass
class AuditItem:
    """Dependence of the classifier's decision on one candidate (image region or metadata attribute).

    ``score``: fraction of decisions that flip when the candidate is swapped (region copied from an
    image the model classifies differently; latent moved to the other attribute group).
    ``acc_drop_remove`` / ``acc_drop_swap``: accuracy lost when it is removed (region filled with the
    data-set mean; attribute direction projected out) or swapped. ``alignment``: |cosine| between
    the latent change it causes and the classifier's decision direction. ``top_latents``: the latent
    axes it moves most (in units of each axis's spread).
    """

    name: str
    kind: str
    score: float
    acc_drop_remove: float
    acc_drop_swap: float
    alignment: float
    top_latents: list[int]
    detail: dict = field(default_factory=dict)


@dataclass
class AuditReport:
    baseline_accuracy: float
    items: list[AuditItem]  # sorted by score, highest first
    threshold: float

    @property
    def ranking(self) -> list[str]:
        return [it.name for it in self.items]

    @property
    def flagged(self) -> list[str]:
        return [it.name for it in self.items if it.score >= self.threshold]

    def to_dict(self) -> dict:
        return {"baseline_accuracy": self.baseline_accuracy, "threshold": self.threshold,
                "ranking": self.ranking, "flagged": self.flagged, "items": [asdict(i) for i in self.items]}


def grid_regions(image_size: int, grid: int) -> dict[str, tuple[int, int, int, int]]:
    """A grid x grid tiling as named regions ``r{row}c{col}`` -> (y0, y1, x0, x1)."""
    if not 1 <= grid <= image_size:
        raise ValueError(f"grid must be in [1, image_size={image_size}], got {grid}")
    edges = np.linspace(0, image_size, grid + 1).round().astype(int)
    return {f"r{i}c{j}": (int(edges[i]), int(edges[i + 1]), int(edges[j]), int(edges[j + 1]))
            for i in range(grid) for j in range(grid)}


def _top_latents(delta: torch.Tensor, spread: torch.Tensor, k: int = 3) -> list[int]:
    return [int(i) for i in (delta.abs().mean(0) / spread.clamp_min(1e-8)).argsort(descending=True)[:k]]


@torch.no_grad()
def bias_audit(model: PumaMedNet, images: torch.Tensor, labels: torch.Tensor, *,
               regions: Optional[dict[str, tuple[int, int, int, int]]] = None, grid: Optional[int] = 4,
               attributes: Optional[dict[str, np.ndarray]] = None, threshold: float = 0.2,
               gen: Optional[torch.Generator] = None) -> AuditReport:
    """Measure how much the classifier's decisions depend on image regions and metadata attributes.

    images: (n, c, s, s); labels: (n,); regions: name -> (y0, y1, x0, x1) (added to a ``grid`` x
    ``grid`` tiling unless ``grid`` is None); attributes: name -> (n,) values (categorical; numeric
    with more than 10 distinct values are split at the median). Use data where the candidate is NOT
    correlated with the label (a held-out set): there a dependence is a shortcut, not a signal.

    Region swap: each image receives the region from a random image the model assigns to another
    class. Attribute swap: the latent mean moves by the attribute's direction, estimated as the
    label-stratified difference of group means of mu, to the other group.
    """
    _check_data(model, images, labels)
    if len(torch.unique(labels)) < 2:
        raise ValueError("bias_audit needs images of at least two classes")
    model.eval()
    n, _, s, _ = images.shape
    gen = gen or torch.Generator().manual_seed(model.cfg.seed + 3)
    dev = next(model.parameters()).device
    images, y = images.to(dev), labels.to(dev)
    mu = model.latent_mean(images)
    spread = mu.std(0)
    pred = model.classifier(mu).argmax(-1)
    base_acc = float((pred == y).float().mean())
    gdir = _margin_grad(model, mu)
    acc = lambda p: float((p == y).float().mean())  # noqa: E731

    def alignment(delta):
        cos = F.cosine_similarity(delta, gdir, dim=-1, eps=1e-8).abs()
        keep = delta.norm(dim=-1) > 1e-6
        return float(cos[keep].mean()) if keep.any() else 0.0

    # donors: an image predicted as another class (else labelled as another class)
    key = pred if len(torch.unique(pred)) > 1 else y
    donors = torch.empty(n, dtype=torch.long, device=dev)
    for c in torch.unique(key):
        idx, pool = torch.nonzero(key == c).flatten(), torch.nonzero(key != c).flatten()
        donors[idx] = pool[torch.randint(len(pool), (len(idx),), generator=gen).to(dev)]
    mean_img = images.mean(0, keepdim=True)

    items = []
    cand = dict(grid_regions(s, grid)) if grid else {}
    for name, reg in (regions or {}).items():
        y0, y1, x0, x1 = (int(v) for v in reg)
        if not (0 <= y0 < y1 <= s and 0 <= x0 < x1 <= s):
            raise ValueError(f"region {name!r} = {reg} must satisfy 0 <= y0 < y1 <= {s}, 0 <= x0 < x1 <= {s}")
        cand[name] = (y0, y1, x0, x1)
    for name, (y0, y1, x0, x1) in cand.items():
        sw = images.clone()
        sw[:, :, y0:y1, x0:x1] = images[donors][:, :, y0:y1, x0:x1]
        rm = images.clone()
        rm[:, :, y0:y1, x0:x1] = mean_img[:, :, y0:y1, x0:x1]
        mu_sw, mu_rm = model.latent_mean(sw), model.latent_mean(rm)
        p_sw, p_rm = model.classifier(mu_sw).argmax(-1), model.classifier(mu_rm).argmax(-1)
        items.append(AuditItem(
            name=name, kind="region", score=float((p_sw != pred).float().mean()),
            acc_drop_remove=base_acc - acc(p_rm), acc_drop_swap=base_acc - acc(p_sw),
            alignment=alignment(mu_sw - mu), top_latents=_top_latents(mu_sw - mu, spread),
            detail={"region": [y0, y1, x0, x1], "flip_rate_remove": float((p_rm != pred).float().mean())}))

    for name, values in (attributes or {}).items():
        v = np.asarray(values)
        if v.shape != (n,):
            raise ValueError(f"attribute {name!r} must have shape ({n},), got {v.shape}")
        note = None
        if np.issubdtype(v.dtype, np.number) and len(np.unique(v)) > 10:
            v = v > np.median(v)
            note = "numeric: split at the median"
        vals, counts = np.unique(v.astype(str), return_counts=True)
        if len(vals) < 2:
            raise ValueError(f"attribute {name!r} has a single value {vals[0]!r}: nothing to audit")
        best = None
        # one group against the rest, for each value; the group the decision depends on most is reported
        for val in vals if len(vals) > 2 else vals[:1]:
            g = torch.as_tensor(v.astype(str) == val, device=dev)
            diffs, weights = [], []
            for c in torch.unique(y):
                a, b = g & (y == c), ~g & (y == c)
                if a.any() and b.any():
                    diffs.append(mu[a].mean(0) - mu[b].mean(0))
                    weights.append(float(min(a.sum(), b.sum())))
            if not diffs:
                continue
            w = torch.tensor(weights, device=dev)
            d = (torch.stack(diffs) * w[:, None]).sum(0) / w.sum()
            delta = torch.where(g[:, None], -d, d)  # move each sample to the other group
            p_sw = model.classifier(mu + delta).argmax(-1)
            dh = d / d.norm().clamp_min(1e-8)
            mu_rm = mu - ((mu - mu.mean(0)) @ dh)[:, None] * dh
            p_rm = model.classifier(mu_rm).argmax(-1)
            it = AuditItem(
                name=name if len(vals) <= 2 else f"{name}={val}", kind="attribute",
                score=float((p_sw != pred).float().mean()), acc_drop_remove=base_acc - acc(p_rm),
                acc_drop_swap=base_acc - acc(p_sw), alignment=alignment(delta),
                top_latents=_top_latents(delta, spread),
                detail={"groups": {str(a): int(b) for a, b in zip(vals, counts)},
                        "direction_norm": float(d.norm()), **({"note": note} if note else {})})
            if best is None or it.score > best.score:
                best = it
        if best is None:
            raise ValueError(f"attribute {name!r}: no class has both groups, the direction cannot be estimated")
        items.append(best)
    items.sort(key=lambda it: (-it.score, -it.acc_drop_swap, it.name))
    return AuditReport(baseline_accuracy=base_acc, items=items, threshold=threshold)


def plot_audit(report: AuditReport, path: str | Path, *, image: Optional[torch.Tensor] = None, max_items: int = 20) -> Path:
    """Bar chart of the candidates' scores (flagged ones in red) and, when ``image`` (c, s, s) is
    given and the report has regions, a heat map of the region scores over it. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ...utils import save_figure

    regs = [it for it in report.items if it.kind == "region"]
    show_map = image is not None and bool(regs)
    fig, axes = plt.subplots(1, 2 if show_map else 1, figsize=(11 if show_map else 6, 4.5), squeeze=False)
    ax = axes[0, 0]
    items = report.items[:max_items][::-1]
    colors = ["tab:red" if it.score >= report.threshold else "tab:gray" for it in items]
    ax.barh([f"{it.name} ({it.kind[0]})" for it in items], [it.score for it in items], color=colors)
    ax.axvline(report.threshold, color="k", ls="--", lw=0.8)
    ax.set_xlabel("decision flip rate when swapped")
    ax.set_title(f"bias audit (baseline accuracy {report.baseline_accuracy:.2f})")
    if show_map:
        s = image.shape[-1]
        heat = np.full((s, s), np.nan)
        for it in regs:
            y0, y1, x0, x1 = it.detail["region"]
            heat[y0:y1, x0:x1] = np.fmax(heat[y0:y1, x0:x1], it.score)
        ax2 = axes[0, 1]
        ax2.imshow(((image.mean(0).cpu().numpy() + 1) / 2), cmap="gray", vmin=0, vmax=1)
        im = ax2.imshow(heat, cmap="Reds", alpha=0.55, vmin=0, vmax=max(1e-6, np.nanmax(heat)))
        fig.colorbar(im, ax=ax2, fraction=0.046)
        ax2.set_title("region flip rate")
        ax2.axis("off")
    return save_figure(fig, path, dpi=100)
