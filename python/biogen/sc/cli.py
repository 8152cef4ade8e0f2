"""``biogen annotate benchmark | train | predict`` and ``biogen demo`` (the main job)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path


def _read_h5ad(path: str, backed: bool = False):
    import anndata as ad

    p = Path(path)
    if p.suffix != ".h5ad":
        raise ValueError(f"{path} is not an .h5ad file")
    if not p.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return ad.read_h5ad(p)
    except Exception as exc:  # h5py/anndata raise many types for a corrupt file
        raise ValueError(f"{path} could not be read as AnnData: {type(exc).__name__}: {exc}") from exc


def _parse_subset(items):
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--subset expects COLUMN=VALUE[,VALUE...], got {item!r}")
        col, vals = item.split("=", 1)
        out[col] = vals.split(",")
    return out or None


def _config(args, models):
    from .benchmark import BenchmarkConfig

    opts = {}
    for name in models:
        if name in ("scgpt", "scbert"):
            o = {"preset": args.preset}
            if args.epochs is not None:
                o["epochs"] = args.epochs
            if getattr(args, "pretrain_epochs", None) is not None:
                o["pretrain_epochs"] = args.pretrain_epochs
            opts[name] = o
    return BenchmarkConfig(label_key=args.label_key, donor_key=args.donor_key, batch_key=args.batch_key,
                           layer=args.layer, models=tuple(models), min_cells_per_class=args.min_cells,
                           drop_labels=tuple(args.drop_labels or ()),
                           keep_labels=tuple(args.keep_labels) if args.keep_labels else None,
                           subset=_parse_subset(args.subset), test_size=args.test_size, seed=args.seed,
                           model_options=opts)


def _print_table(result, out):
    cols = ["model", "accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted", "cells_per_s",
            "train_s", "peak_mem_mb"]
    print(result.metrics[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for note in result.notes:
        print(f"note: {note}")
    print(f"\nwrote {out}/ (report.md, metrics.csv, per_class.csv, split.csv, plots, predictions.h5ad)")


def _models(arg):
    from .benchmark import ANNOTATORS

    return list(ANNOTATORS) if arg in (None, "all") else [m.strip() for m in arg.split(",") if m.strip()]


def _cmd_benchmark(args) -> int:
    from .benchmark import run_benchmark

    config = _config(args, _models(args.models))  # validates model names before reading the data
    adata = _read_h5ad(args.h5ad)
    res = run_benchmark(adata, config, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    _print_table(res, args.out)
    return 0


def _cmd_train(args) -> int:
    from .. import distributed as bdist
    from ..utils import atomic_path, prepare_output_dir, write_json
    from .benchmark import ANNOTATORS, check_label_key
    from .preprocess import check_counts

    if args.model not in ANNOTATORS:
        raise ValueError(f"unknown model {args.model!r}; available: {sorted(ANNOTATORS)}")
    adata = _read_h5ad(args.h5ad)
    check_label_key(adata, args.label_key)
    check_counts(adata, layer=args.layer)
    # Under torchrun the transformers train with DDP on every rank; rank 0 alone writes.
    bdist.init()
    out = prepare_output_dir(args.out, overwrite=args.overwrite) if bdist.is_main() else Path(args.out)
    bdist.barrier()
    opts = {"preset": args.preset} if args.model in ("scgpt", "scbert") else {}
    if args.epochs is not None and args.model in ("scgpt", "scbert"):
        opts["epochs"] = args.epochs
    model = ANNOTATORS[args.model](**opts)
    model.fit(adata, args.label_key, layer=args.layer, batch_key=args.batch_key)
    if not bdist.is_main():
        return 0
    if hasattr(model, "save"):
        model.save(out / "model")
    else:  # scikit-learn baselines: a pickle, loadable only by code you trust (as any pickle)
        with atomic_path(out / "model.pkl") as tmp, open(tmp, "wb") as f:
            pickle.dump(model, f)
    write_json(out / "annotator.json", {"model": args.model, "label_key": args.label_key, "layer": args.layer})
    print(f"trained {args.model} on {adata.n_obs} cells; saved to {out}")
    return 0


def _cmd_predict(args) -> int:
    from ..utils import atomic_path
    from .benchmark import ANNOTATORS

    d = Path(args.model_dir)
    meta_path = d / "annotator.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{d} is not a folder written by 'biogen annotate train' (no annotator.json)")
    meta = json.loads(meta_path.read_text())
    factory = ANNOTATORS[meta["model"]]
    if (d / "model").is_dir():
        model = factory.load(d / "model")
    else:
        with open(d / "model.pkl", "rb") as f:
            model = pickle.load(f)
    adata = _read_h5ad(args.h5ad)
    out = Path(args.out)
    if out.resolve() == Path(args.h5ad).resolve():
        raise ValueError("--out must differ from --h5ad: biogen never overwrites your input")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    pred = model.predict(adata)
    name = meta["model"]
    adata.obs[f"{name}_pred"] = pred.labels
    if pred.proba is not None:
        adata.obsm[f"{name}_proba"] = pred.proba
        adata.uns[f"{name}_proba_classes"] = list(pred.classes)
    if pred.embedding is not None:
        adata.obsm[f"X_{name}"] = pred.embedding
    with atomic_path(out) as tmp:
        adata.write_h5ad(tmp)
    counts = adata.obs[f"{name}_pred"].value_counts()
    print(counts.to_string())
    print(f"wrote {out}")
    return 0


def _cmd_demo(args) -> int:
    import time

    from .benchmark import BenchmarkConfig, run_benchmark
    from .datasets import pbmc68k

    models = _models(args.models)
    opts = {m: {"preset": args.preset} for m in models if m in ("scgpt", "scbert")}
    config = BenchmarkConfig(label_key="bulk_labels", layer="counts", models=tuple(models), seed=args.seed,
                             model_options=opts)
    t0 = time.perf_counter()
    adata = pbmc68k()
    res = run_benchmark(adata, config, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"biogen demo: cell annotation on scanpy's bundled pbmc68k_reduced (700 cells, 10 bulk_labels), "
          f"{time.perf_counter() - t0:.0f} s\n")
    _print_table(res, args.out)
    return 0


def _common(p, *, label=True):
    if label:
        p.add_argument("--label-key", required=True, help="adata.obs column with the cell-type labels")
    p.add_argument("--layer", help="layer holding raw counts (default: adata.X)")
    p.add_argument("--batch-key", help="adata.obs column with the sequencing batch (optional)")


def _filters(p):
    p.add_argument("--donor-key", help="adata.obs column with the donor/patient: split by donor, the donors "
                   "with the most cells forming the reference (the thesis's protocol); default: stratified split")
    p.add_argument("--min-cells", type=int, default=0, help="drop classes with fewer cells (thesis: 100; default 0)")
    p.add_argument("--drop-labels", nargs="+", metavar="LABEL", help="drop cells with these labels (e.g. Unknown)")
    p.add_argument("--keep-labels", nargs="+", metavar="LABEL", help="keep only cells with these labels")
    p.add_argument("--subset", nargs="+", metavar="COL=V1,V2", help="keep cells whose obs column has one of the values")
    p.add_argument("--test-size", type=float, default=0.2, help="held-out fraction (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the split and the models (default 0)")


def _model_opts(p):
    p.add_argument("--preset", default="small", help="transformer preset: tiny, small or paper (default small)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs of the transformer models (default: the preset's)")


def add_cli(sub) -> None:
    from .benchmark import ANNOTATORS

    names = ", ".join(sorted(ANNOTATORS))
    p = sub.add_parser("annotate", help="cell-type annotation: the thesis's benchmark, training, prediction",
                       description="Cell-type annotation on AnnData (.h5ad with raw counts).")
    s = p.add_subparsers(dest="annotate_command", metavar="COMMAND", required=True)
    b = s.add_parser("benchmark", help="compare annotators on a reference / held-out split",
                     description="Filter, split, train every selected model on the reference split, predict "
                     "the held-out cells, and write metrics.csv, per_class.csv, split.csv, confusion matrices, "
                     "UMAPs, predictions.h5ad and report.md.")
    b.add_argument("--h5ad", required=True, help="input AnnData with raw counts")
    _common(b)
    _filters(b)
    b.add_argument("--models", default="all", help=f"comma-separated models to run, or 'all' (available: {names})")
    _model_opts(b)
    b.add_argument("--pretrain-epochs", type=int, help="self-supervised pretraining epochs on the reference cells "
                   "before fine-tuning (transformer models; default: the preset's)")
    b.add_argument("--out", required=True, help="output folder (must be new or empty unless --overwrite)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder (only once all succeeds)")
    b.add_argument("--no-progress", action="store_true", help="hide progress bars")
    b.set_defaults(func=_cmd_benchmark)

    t = s.add_parser("train", help="train one annotator and save it",
                     description="Train one model on all cells of an .h5ad and save it for 'annotate predict'.")
    t.add_argument("--h5ad", required=True, help="reference AnnData with raw counts")
    _common(t)
    t.add_argument("--model", required=True, help=f"model to train ({names})")
    _model_opts(t)
    t.add_argument("--out", required=True, help="folder to save the model in")
    t.add_argument("--overwrite", action="store_true", help="allow a non-empty output folder")
    t.set_defaults(func=_cmd_train)

    q = s.add_parser("predict", help="annotate a new .h5ad with a saved model",
                     description="Predict labels for every cell of an .h5ad; writes a new .h5ad with "
                     "obs['<model>_pred'], obsm['<model>_proba'] and obsm['X_<model>'] (never the input file).")
    q.add_argument("--model", "--model-dir", dest="model_dir", required=True,
                   help="folder written by 'biogen annotate train' (--model-dir: the older spelling)")
    q.add_argument("--h5ad", required=True, help="query AnnData with raw counts")
    q.add_argument("--out", required=True, help="output .h5ad")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.set_defaults(func=_cmd_predict)

    d = sub.add_parser("demo", help="the main job: the annotation benchmark on bundled real data",
                       description="Run the annotation benchmark on scanpy's bundled pbmc68k_reduced (real "
                       "PBMCs, counts recovered, 10 bulk_labels) with CPU-sized presets; writes a report "
                       "folder. Finishes in minutes on a laptop CPU.")
    d.add_argument("--out", default="biogen-demo", help="output folder (default biogen-demo)")
    d.add_argument("--models", default="all", help=f"comma-separated models or 'all' (available: {names})")
    d.add_argument("--preset", default="small", help="transformer preset (default small)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.set_defaults(func=_cmd_demo)
