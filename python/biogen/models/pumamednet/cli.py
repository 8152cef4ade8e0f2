"""``biogen pumamednet train | explain | audit | demo``."""

from __future__ import annotations

import argparse
import csv
from dataclasses import replace
from pathlib import Path

import numpy as np

from ...cliargs import add_device, add_out, add_resume, add_seed, command_group, resolve_device


def _read(data: str | Path, size: int, channels: int):
    from .data import load_images

    folder = load_images(data, size=size, grayscale=channels == 1)
    for note in folder.notes[:5]:
        print(f"note: {note}")
    for path, why in folder.skipped:
        print(f"skipped {path}: {why}")
    return folder


def _skipped(folder) -> list[dict]:
    return [{"path": str(p), "reason": why} for p, why in folder.skipped]


def _train(data, out: Path, cfg, device, val_fraction: float, resume: bool = False) -> dict:
    """Train on an image folder; write model/, history.json and reconstructions.png into ``out``.

    The VAE's checkpoint goes to ``out/checkpoint`` after every epoch; ``resume`` continues from it.

    Under torchrun every process trains (DDP) and evaluates its shard of the validation split; only
    rank 0 writes.
    """
    import torch

    from ... import distributed as bdist
    from ...data.images import save_grid
    from ...utils import write_json
    from .network import PumaMedNet
    from .training import fit_classifier, fit_vae

    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    folder = _read(data, cfg.image_size, cfg.in_channels)
    cfg = replace(cfg, n_classes=len(folder.classes))
    x, y = torch.from_numpy(folder.images), torch.from_numpy(folder.labels)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    n_val = int(round(val_fraction * len(x)))
    val, tr = perm[:n_val], perm[n_val:]
    if len(torch.unique(y[tr])) < 2:
        raise ValueError("the training split holds a single class; add images or lower --val-fraction")
    torch.manual_seed(cfg.seed)
    model = PumaMedNet(cfg, folder.classes).to(device)
    history = fit_vae(model, x[tr].to(device), checkpoint_dir=out / "checkpoint", resume=resume)
    clf = fit_classifier(model, x[tr].to(device), y[tr].to(device))
    if n_val:
        if bdist.world_size() == 1:
            pred = model.predict(x[val].to(device)).cpu()
            clf["val_accuracy"] = float((pred == y[val]).float().mean())
        else:
            mine = val[np.array_split(np.arange(n_val), bdist.world_size())[bdist.rank()]]
            right = float((model.predict(x[mine].to(device)).cpu() == y[mine]).sum()) if len(mine) else 0.0
            clf["val_accuracy"] = float(bdist.all_reduce_sum(right) / n_val)
    summary = {"n_train": len(tr), "n_val": n_val, "classes": folder.classes, "vae": history,
               "classifier": clf, "skipped": _skipped(folder), "notes": folder.notes}
    if not bdist.is_main():
        return summary
    model.save(out / "model")
    with torch.no_grad():
        xs = x[:8].to(device)
        rec = model.reconstruct(xs)
    save_grid(torch.stack([xs, rec], 1).flatten(0, 1).cpu().numpy(), out / "reconstructions.png", nrow=2)
    write_json(out / "history.json", {**summary, "world_size": bdist.world_size()})
    return summary


def _config_from_args(args):
    from .network import PRESETS

    over = {k: v for k, v in {
        "image_size": args.image_size, "latent_dim": args.latent_dim, "beta": args.beta, "epochs": args.epochs,
        "clf_epochs": args.clf_epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
    }.items() if v is not None}
    if args.rgb:
        over["in_channels"] = 3
    if args.finetune:
        over["finetune_encoder"] = True
    if args.no_attention:
        over["attention"] = False
    return replace(PRESETS[args.preset], **over)


def _cmd_train(args) -> int:
    from ... import distributed as bdist
    from ...checkpoint import checkpoint_note
    from ...errors import on_interrupt, resume_command
    from ...utils import prepare_output_dir

    cfg = _config_from_args(args)
    dev = resolve_device(args.device)
    if args.resume:
        out = Path(args.out)
        if not (out / "checkpoint" / "trainer_state.json").exists():
            raise FileNotFoundError(f"--resume: {out / 'checkpoint'} holds no checkpoint of an earlier 'train'")
    else:
        out = prepare_output_dir(args.out, overwrite=args.overwrite)
    bdist.barrier()  # every process has checked the folder before rank 0 writes into it
    with on_interrupt(lambda: checkpoint_note(out / "checkpoint", resume_command(args.argv))):
        s = _train(args.data, out, cfg, dev, args.val_fraction, resume=args.resume)
    bdist.barrier()
    acc = s["classifier"].get("val_accuracy")
    print(f"trained on {s['n_train']} image(s), classes {s['classes']}; train accuracy "
          f"{s['classifier']['train_accuracy']:.3f}" + (f", validation accuracy {acc:.3f}" if acc is not None else "")
          + f"; model in {out / 'model'}")
    return 0


def _explain(model_dir, data, out: Path, device, n_images: int, n_steps: int, top_k: int) -> dict:
    import torch

    from ...utils import write_json
    from .explain import explain
    from .network import PumaMedNet

    model = PumaMedNet.load(model_dir, map_location=device)
    folder = _read(data, model.cfg.image_size, model.cfg.in_channels)
    res = explain(model, torch.from_numpy(folder.images).to(device), out, n_images=n_images, n_steps=n_steps,
                  top_k=top_k)
    res["skipped"] = _skipped(folder)
    write_json(out / "explain.json", res)
    return res


def _cmd_explain(args) -> int:
    from ...utils import prepare_output_dir

    out = prepare_output_dir(args.out, overwrite=args.overwrite)
    res = _explain(args.model, args.data, out, resolve_device(args.device), args.n_images, args.n_steps, args.top_k)
    print(f"latent axes most used by the classifier: {res['top_latent_dims']}; wrote "
          f"{', '.join(res['files'])} and explain.json to {out}")
    return 0


def _parse_region(text: str) -> tuple[str, tuple[int, int, int, int]]:
    try:
        name, spec = text.split("=", 1)
        ys, xs = spec.split(",")
        y0, y1 = (int(v) for v in ys.split(":"))
        x0, x1 = (int(v) for v in xs.split(":"))
    except ValueError:
        raise ValueError(f"--region must look like NAME=y0:y1,x0:x1 (pixels), got {text!r}") from None
    return name, (y0, y1, x0, x1)


def _read_metadata(path: str | Path, folder, data_root: str | Path, columns) -> dict[str, np.ndarray]:
    """Attribute columns of a CSV with a ``path`` column (relative to the data folder), in folder order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--metadata file {path} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "path" not in rows[0]:
        raise ValueError(f"--metadata {path} must be a CSV with a 'path' column (relative to the data folder)")
    by_path = {Path(r["path"]).as_posix(): r for r in rows}
    cols = list(columns) if columns else [c for c in rows[0] if c != "path"]
    missing_cols = [c for c in cols if c not in rows[0]]
    if missing_cols:
        raise ValueError(f"--attribute column(s) {missing_cols} not in {path} (columns: {list(rows[0])})")
    root = Path(data_root)
    keys = [Path(p).relative_to(root).as_posix() for p in folder.paths]
    missing = [k for k in keys if k not in by_path]
    if missing:
        raise ValueError(f"{len(missing)} image(s) have no row in {path}, e.g. {missing[:3]}")
    out = {}
    for c in cols:
        vals = [by_path[k][c] for k in keys]
        try:
            out[c] = np.asarray([float(v) for v in vals])
        except ValueError:
            out[c] = np.asarray(vals)
    return out


def _audit(model_dir, data, out: Path, device, *, metadata=None, attributes=None, regions=(), grid: int = 4,
           threshold: float = 0.2, seed: int = 0):
    import torch

    from ...utils import write_json
    from .audit import bias_audit, plot_audit
    from .network import PumaMedNet

    model = PumaMedNet.load(model_dir, map_location=device)
    folder = _read(data, model.cfg.image_size, model.cfg.in_channels)
    if folder.classes != model.classes:
        raise ValueError(f"classes of {data} {folder.classes} differ from the model's {model.classes}")
    attrs = _read_metadata(metadata, folder, data, attributes) if metadata else None
    if attributes and not metadata:
        raise ValueError("--attribute needs --metadata")
    regs = dict(_parse_region(r) for r in regions)
    x = torch.from_numpy(folder.images).to(device)
    rep = bias_audit(model, x, torch.from_numpy(folder.labels).to(device), regions=regs, grid=grid or None,
                     attributes=attrs, threshold=threshold, gen=torch.Generator().manual_seed(seed))
    d = rep.to_dict()
    d["skipped"] = _skipped(folder)
    write_json(out / "audit.json", d)
    plot_audit(rep, out / "audit.png", image=x.mean(0))
    return rep


def _print_audit(rep, n: int = 5) -> None:
    print(f"baseline accuracy {rep.baseline_accuracy:.3f}; candidates ranked by decision flip rate when swapped:")
    for it in rep.items[:n]:
        flag = "  FLAGGED" if it.score >= rep.threshold else ""
        print(f"  {it.name:>14s} ({it.kind}): flip {it.score:.3f}, accuracy drop swap {it.acc_drop_swap:+.3f} / "
              f"remove {it.acc_drop_remove:+.3f}, alignment {it.alignment:.2f}, latents {it.top_latents}{flag}")


def _cmd_audit(args) -> int:
    from ...utils import prepare_output_dir

    out = prepare_output_dir(args.out, overwrite=args.overwrite)
    rep = _audit(args.model, args.data, out, resolve_device(args.device), metadata=args.metadata,
                 attributes=args.attribute, regions=args.region or (), grid=args.grid, threshold=args.threshold,
                 seed=args.seed)
    _print_audit(rep)
    print(f"wrote audit.json and audit.png to {out}")
    return 0


def _cmd_demo(args) -> int:
    from ... import distributed as bdist
    from ...utils import prepare_output_dir, write_json
    from .audit import grid_regions
    from .data import make_synthetic_cxr, write_synthetic_folder
    from .network import PRESETS

    dev = resolve_device(args.device)
    out = prepare_output_dir(args.out, overwrite=args.overwrite)
    bdist.barrier()
    cfg = replace(PRESETS[args.preset], seed=args.seed, **({"epochs": args.epochs} if args.epochs else {}))
    s = cfg.image_size
    train = make_synthetic_cxr(args.n_train, size=s, shortcut=args.shortcut, seed=args.seed)
    test = make_synthetic_cxr(args.n_test, size=s, shortcut=0.0, seed=args.seed + 10_000)
    if bdist.is_main():
        write_synthetic_folder(train, out / "data" / "train")
        write_synthetic_folder(test, out / "data" / "test")
    bdist.barrier()  # the other processes read the folders rank 0 wrote
    print(f"synthetic chest X-rays: {args.n_train} train (marker/label correlation {args.shortcut}), "
          f"{args.n_test} test (none); marker at {list(train.marker_region)}")
    summ = _train(out / "data" / "train", out / "train", cfg, dev, val_fraction=0.2)
    if not bdist.is_main():  # explanation and audit are rank 0's (single-process) work
        bdist.barrier()
        return 0
    print(f"train accuracy {summ['classifier']['train_accuracy']:.3f}, validation (same distribution as training) "
          f"{summ['classifier'].get('val_accuracy', float('nan')):.3f}")
    _explain(out / "train" / "model", out / "data" / "test", out / "explain", dev, 8, 7, 6)
    (out / "audit").mkdir(exist_ok=True)
    rep = _audit(out / "train" / "model", out / "data" / "test", out / "audit", dev,
                 metadata=out / "data" / "test" / "metadata.csv", grid=4, threshold=args.threshold, seed=args.seed)
    _print_audit(rep)
    y0, y1, x0, x1 = train.marker_region
    corner = next(k for k, (a, b, c, d) in grid_regions(s, 4).items() if a <= y0 and y1 <= b and c <= x0 and x1 <= d)
    regions = [it for it in rep.items if it.kind == "region"]
    attrs = [it for it in rep.items if it.kind == "attribute"]
    found_region = regions[0].name == corner and regions[0].score >= rep.threshold
    found_attr = attrs[0].name == "marker" and attrs[0].score >= rep.threshold
    verdict = {"marker_grid_cell": corner, "top_region": regions[0].name, "top_attribute": attrs[0].name,
               "shortcut_flagged_by_region": found_region, "shortcut_flagged_by_attribute": found_attr,
               "test_accuracy": rep.baseline_accuracy}
    write_json(out / "verdict.json", verdict)
    if found_region or found_attr:
        print(f"shortcut found: the decision depends on the corner marker (region {corner}: "
              f"{'top' if found_region else 'not top'}; attribute 'marker': {'top' if found_attr else 'not top'})")
    else:
        print("no shortcut flagged: the decision does not depend on the corner marker")
    print(f"outputs in {out}: data/, train/, explain/, audit/, verdict.json")
    bdist.barrier()
    return 0


def _common(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    if model:
        p.add_argument("--model", required=True, help="folder of a trained model (the model/ folder written by train)")
        p.add_argument("--data", required=True, help="image folder, one sub-folder per class (PNG, JPEG, DICOM)")
    add_out(p)
    add_device(p)


def add_cli(sub) -> None:
    from .network import PRESETS

    ps = command_group(
        sub, "pumamednet", help="denoising beta-VAE for explainable, bias-aware image classification",
        description="PumaMedNet: a denoising beta-VAE with attention-weighted reconstruction; a classifier on "
        "the latent mean; explanations (reconstructions, latent traversals, attention maps) and a bias audit.")

    p = ps.add_parser("train", help="train the VAE and the latent classifier on an image folder",
                      description="Train on an image folder (one sub-folder per class). Writes model/ "
                      "(model.safetensors + config.json), history.json and reconstructions.png.")
    p.add_argument("--data", required=True, help="image folder, one sub-folder per class (PNG, JPEG, DICOM)")
    _common(p, model=False)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="size preset: tiny (tests, 32 px), cpu (demo, 64 px), paper (256 px); default cpu")
    p.add_argument("--image-size", type=int, help="image side in pixels (overrides the preset)")
    p.add_argument("--rgb", action="store_true", help="use colour images (default: grayscale)")
    p.add_argument("--latent-dim", type=int, help="latent size (overrides the preset)")
    p.add_argument("--beta", type=float, help="weight of the KL term (overrides the preset, default 4)")
    p.add_argument("--epochs", type=int, help="VAE training epochs (overrides the preset)")
    p.add_argument("--clf-epochs", type=int, help="classifier steps on the frozen latents (overrides the preset)")
    p.add_argument("--batch-size", type=int, help="minibatch size (overrides the preset)")
    p.add_argument("--lr", type=float, help="VAE learning rate (overrides the preset)")
    p.add_argument("--finetune", action="store_true", help="fine-tune the encoder with the classifier")
    p.add_argument("--no-attention", action="store_true", help="unweighted reconstruction loss (no attention head)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction for validation (default 0.2)")
    add_resume(p, "continue an interrupted run from OUT/checkpoint (same data and options; any number of processes)")
    add_seed(p, default=None)
    p.set_defaults(func=_cmd_train)

    p = ps.add_parser("explain", help="write reconstructions, latent traversals and attention maps",
                      description="Write reconstructions.png, traversals.png (latent axes the classifier uses "
                      "most), classifier_direction.png, attention.png and explain.json.")
    _common(p)
    p.add_argument("--n-images", type=int, default=8, help="images in the reconstruction/attention grids (default 8)")
    p.add_argument("--n-steps", type=int, default=7, help="steps along each latent axis, over [-3, 3] (default 7)")
    p.add_argument("--top-k", type=int, default=6, help="latent axes to traverse (default 6)")
    p.set_defaults(func=_cmd_explain)

    p = ps.add_parser("audit", help="measure how much decisions depend on image regions or metadata attributes",
                      description="Bias audit on held-out data: for each candidate (grid cells, named regions, "
                      "metadata columns) the fraction of decisions that flip when it is swapped, the accuracy lost "
                      "when it is removed or swapped, and the latent axes it moves. Writes audit.json and audit.png.")
    _common(p)
    p.add_argument("--metadata", help="CSV with a 'path' column (relative to --data) and attribute columns")
    p.add_argument("--attribute", action="append",
                   help="metadata column to audit (repeatable; default: every column but 'path')")
    p.add_argument("--region", action="append", help="named region NAME=y0:y1,x0:x1 in pixels (repeatable)")
    p.add_argument("--grid", type=int, default=4, help="also audit a GRID x GRID tiling of the image; 0: none (default 4)")
    p.add_argument("--threshold", type=float, default=0.2, help="flip rate from which a candidate is flagged (default 0.2)")
    add_seed(p, "seed for choosing swap donors (default 0)")
    p.set_defaults(func=_cmd_audit)

    p = ps.add_parser("demo", help="synthetic chest X-rays with a planted shortcut: train, explain, audit",
                      description="Make synthetic chest-X-ray-like images whose training split has a corner marker "
                      "correlated with the label (test split: uncorrelated), train, explain and audit; the audit "
                      "should flag the marker.")
    _common(p, model=False)
    p.add_argument("--preset", choices=["tiny", "cpu"], default="cpu", help="tiny (32 px, fast) or cpu (64 px); default cpu")
    p.add_argument("--n-train", type=int, default=600, help="training images (default 600)")
    p.add_argument("--n-test", type=int, default=300, help="test images (default 300)")
    p.add_argument("--shortcut", type=float, default=0.9,
                   help="marker/label correlation in training, 0..1; 0 plants no shortcut (default 0.9)")
    p.add_argument("--epochs", type=int, help="VAE epochs (overrides the preset)")
    p.add_argument("--threshold", type=float, default=0.2, help="flip rate from which a candidate is flagged (default 0.2)")
    add_seed(p)
    p.set_defaults(func=_cmd_demo)
