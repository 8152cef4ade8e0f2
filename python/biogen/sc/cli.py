"""``biogen annotate benchmark | train | predict`` and ``biogen demo`` (the main job)."""

from __future__ import annotations

from pathlib import Path

from ..cliargs import add_device, add_no_progress, add_out, add_seed, command_group
from ..errors import IncompatibleError, InputError

# The demo's repeats: paired splits enough for a t-test with 4 degrees of freedom; the demo then takes about
# 8 min on 2 idle cores (466 s wall, 907 s of CPU time measured; scGPT's training is most of it).
DEMO_REPEATS = 5

#: ``manifest.json`` format of the folders ``annotate train`` writes (see :mod:`biogen._io`)
ANNOTATOR_FORMAT, ANNOTATOR_VERSION = "biogen.annotator", 1
_RETRAIN = "train it again with 'biogen annotate train'"


def _read_h5ad(path: str):
    from .._io import read_h5ad

    return read_h5ad(path)


def _parse_subset(items):
    out = {}
    for item in items or []:
        if "=" not in item:
            raise InputError(f"--subset expects COLUMN=VALUE[,VALUE...], got {item!r}")
        col, vals = item.split("=", 1)
        out[col] = vals.split(",")
    return out or None


TRANSFORMERS = ("scgpt", "scbert")


def _transformer_opts(args) -> dict:
    """The options of the transformer annotators from the command line (the baselines take none)."""
    from ..cliargs import resolve_device

    o = {"preset": args.preset, "device": str(resolve_device(args.device))}
    if getattr(args, "epochs", None) is not None:
        o["epochs"] = args.epochs
    if getattr(args, "pretrain_epochs", None) is not None:
        o["pretrain_epochs"] = args.pretrain_epochs
    return o


def _config(args, models):
    from .benchmark import BenchmarkConfig

    opts = {name: _transformer_opts(args) for name in models if name in TRANSFORMERS}
    return BenchmarkConfig(label_key=args.label_key, donor_key=args.donor_key, batch_key=args.batch_key,
                           layer=args.layer, models=tuple(models), min_cells_per_class=args.min_cells,
                           drop_labels=tuple(args.drop_labels or ()),
                           keep_labels=tuple(args.keep_labels) if args.keep_labels else None,
                           subset=_parse_subset(args.subset), test_size=args.test_size, seed=args.seed,
                           model_options=opts)


def _print_table(result, out):
    if result.summary is None:
        cols = ["model", "accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted", "cells_per_s",
                "train_s", "peak_mem_mb"]
        print(result.metrics[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    else:
        s = result.summary
        n = int(s["n"].iloc[0])
        order = list(dict.fromkeys(result.metrics["model"]))
        table = s.pivot(index="model", columns="metric", values="mean").loc[order, ["accuracy", "f1_macro",
                                                                                    "f1_weighted", "train_s"]]
        sd = s[s["metric"] == "f1_macro"].set_index("model").loc[order]
        table.insert(2, "f1_macro_sd", sd["std"])
        table.insert(3, "f1_macro_ci", [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(sd["ci_low"], sd["ci_high"])])
        print(f"mean over {n} repeats (sd, 95 % interval of the mean macro F1):")
        print(table.to_string(float_format=lambda v: f"{v:.3f}"))
        c = result.comparisons
        sig = c[(c["metric"] == "f1_macro") & c["significant"]]
        print("significant macro F1 differences (corrected paired t-test, Holm p < 0.05): "
              + (", ".join(f"{r.a if r.mean_diff > 0 else r.b} > {r.b if r.mean_diff > 0 else r.a} "
                           f"({abs(r.mean_diff):.3f}, p {r.p_holm:.2g})" for r in sig.itertuples()) or "none"))
    for note in result.notes:
        print(f"note: {note}")
    info = result.run_info
    print(f"\n{info['wall_s']:.0f} s, peak RSS {info['peak_rss_mb']} MB, {info['torch_threads']} torch threads")
    print(f"wrote {out}/ (report.md, metrics.csv, "
          + ("summary.csv, comparisons.csv, " if result.summary is not None else "")
          + "per_class.csv, split.csv, run.json, plots, predictions.h5ad)")


def _models(arg):
    from .benchmark import ANNOTATORS

    return list(ANNOTATORS) if arg in (None, "all") else [m.strip() for m in arg.split(",") if m.strip()]


def _unchanged(out) -> str:
    return f"nothing was written; {out} is as it was (outputs are replaced only once complete)"


def _cmd_benchmark(args) -> int:
    from ..errors import on_interrupt
    from .benchmark import check_unique_genes, run_benchmark

    config = _config(args, _models(args.models))  # validates model names before reading the data
    adata = _read_h5ad(args.h5ad)
    check_unique_genes(adata, "input", path=args.h5ad)
    with on_interrupt(lambda: _unchanged(args.out)):
        res = run_benchmark(adata, config, args.out, repeats=args.repeats, overwrite=args.overwrite,
                            progress=not args.no_progress)
    _print_table(res, args.out)
    return 0


def _cmd_train(args) -> int:
    from .. import distributed as bdist
    from .._io import check_output_dir, replacing_dir, write_manifest
    from ..errors import on_interrupt
    from ..utils import write_json
    from .benchmark import ANNOTATORS, check_label_key, check_unique_genes, save_baseline
    from .preprocess import check_counts

    if args.model not in ANNOTATORS:
        raise InputError(f"unknown model {args.model!r}; available: {sorted(ANNOTATORS)}")
    opts = {"seed": args.seed}
    if args.model in TRANSFORMERS:  # resolves --device: an unusable one fails before the data is read
        opts.update(_transformer_opts(args), progress=not args.no_progress)
    adata = _read_h5ad(args.h5ad)
    check_label_key(adata, args.label_key)
    check_counts(adata, layer=args.layer)
    check_unique_genes(adata, "reference", path=args.h5ad)
    # Under torchrun the transformers train with DDP on every rank; rank 0 alone writes.
    bdist.init()
    out = Path(args.out)
    if bdist.is_main():
        check_output_dir(out, overwrite=args.overwrite)  # before training, not after
    bdist.barrier()
    model = ANNOTATORS[args.model](**opts)
    with on_interrupt(lambda: f"no model was saved and {out} is as it was; run the same command again "
                              "to train from the start"):
        model.fit(adata, args.label_key, layer=args.layer, batch_key=args.batch_key)
        if not bdist.is_main():
            return 0
        # The whole folder is written beside --out and swapped in: nothing of an earlier model remains.
        with replacing_dir(out, overwrite=args.overwrite) as tmp:
            save = getattr(model, "save", None)
            save(tmp / "model") if save is not None else save_baseline(model, tmp / "model")
            write_json(tmp / "annotator.json", {"model": args.model, "label_key": args.label_key,
                                                "layer": args.layer})
            write_manifest(tmp, ANNOTATOR_FORMAT, ANNOTATOR_VERSION, model=args.model)
    print(f"trained {args.model} on {adata.n_obs} cells; saved to {out}")
    return 0


def load_annotator(model_dir, device=None):
    """Verify and load a folder written by ``annotate train``: ``(model name, annotator.json, model)``;
    ``device``: where a transformer's weights go (the baselines run on the CPU)."""
    from .._io import MANIFEST, read_json, verify_folder
    from .benchmark import ANNOTATORS, load_baseline

    d = Path(model_dir)
    if (d / "model.pkl").is_file() and not (d / MANIFEST).exists():
        raise IncompatibleError("is a pickled model of an older biogen, which biogen no longer loads (loading a "
                                "pickle can run any code)", path=d / "model.pkl", hint=_RETRAIN)
    verify_folder(d, ANNOTATOR_FORMAT, version=ANNOTATOR_VERSION, what="annotator model folder", redo=_RETRAIN)
    meta = read_json(d / "annotator.json", what="annotator description", hint=_RETRAIN)
    name = meta.get("model") if isinstance(meta, dict) else None
    if name not in ANNOTATORS:
        raise IncompatibleError(f"names model {name!r}, which this biogen does not have (it has "
                                f"{sorted(ANNOTATORS)})", path=d / "annotator.json", hint="upgrade biogen")
    factory = ANNOTATORS[name]
    load = getattr(factory, "load", None)
    if load is not None:
        model = load(d / "model", device=device) if name in TRANSFORMERS else load(d / "model")
    else:  # a baseline registered without the save/load mixin
        model = load_baseline(d / "model", factory if isinstance(factory, type) else None)
    return name, meta, model


def _cmd_predict(args) -> int:
    from .._io import check_output_file
    from ..utils import atomic_path
    from .benchmark import check_unique_genes

    out = Path(args.out)
    if out.resolve() == Path(args.h5ad).resolve():
        raise InputError("--out must differ from --h5ad: biogen never overwrites your input", path=out)
    check_output_file(out, args.overwrite)
    from ..cliargs import resolve_device

    name, meta, model = load_annotator(args.model_dir, device=resolve_device(args.device))
    adata = _read_h5ad(args.h5ad)
    check_unique_genes(adata, "query", path=args.h5ad)
    pred = model.predict(adata)
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

    from ..errors import on_interrupt
    from .benchmark import BenchmarkConfig, run_benchmark
    from .datasets import pbmc68k

    models = _models(args.models)
    opts = {m: _transformer_opts(args) for m in models if m in TRANSFORMERS}
    config = BenchmarkConfig(label_key="bulk_labels", layer="counts", models=tuple(models), seed=args.seed,
                             model_options=opts)
    t0 = time.perf_counter()
    adata = pbmc68k()
    with on_interrupt(lambda: _unchanged(args.out)):
        res = run_benchmark(adata, config, args.out, repeats=args.repeats, overwrite=args.overwrite,
                            progress=not args.no_progress)
    print(f"biogen demo: cell annotation on scanpy's bundled pbmc68k_reduced (700 cells, 10 bulk_labels), "
          f"{args.repeats} stratified 80/20 splits, {time.perf_counter() - t0:.0f} s\n")
    _print_table(res, args.out)
    return 0


def _positive_int(v: str) -> int:
    import argparse

    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v!r}")
    return n


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
    add_seed(p, "random seed for the split and the models (default 0)")
    p.add_argument("--repeats", type=_positive_int, default=1, help="run the protocol N times with seeds SEED..SEED+N-1 "
                   "(new split and model seeds each time, shared by all models) and compare the models pair by pair "
                   "over the N splits (default 1)")


def _model_opts(p):
    p.add_argument("--preset", default="small", help="transformer preset: tiny, small or paper (default small)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs of the transformer models (default: the preset's)")
    add_device(p)


def add_cli(sub) -> None:
    from .benchmark import ANNOTATORS

    names = ", ".join(sorted(ANNOTATORS))
    s = command_group(sub, "annotate", metavar="COMMAND",
                      help="cell-type annotation: the thesis's benchmark, training, prediction",
                      description="Cell-type annotation on AnnData (.h5ad with raw counts).")
    b = s.add_parser("benchmark", help="compare annotators on a reference / held-out split",
                     description="Filter, split, train every selected model on the reference split, predict "
                     "the held-out cells, and write metrics.csv, per_class.csv, split.csv, confusion matrices, "
                     "UMAPs, predictions.h5ad, run.json and report.md; with --repeats N >= 2 also summary.csv "
                     "(mean, sd, 95 % interval), comparisons.csv (paired tests between models) and f1_repeats.png.")
    b.add_argument("--h5ad", required=True, help="input AnnData with raw counts")
    _common(b)
    _filters(b)
    b.add_argument("--models", default="all", help=f"comma-separated models to run, or 'all' (available: {names})")
    _model_opts(b)
    b.add_argument("--pretrain-epochs", type=int, help="self-supervised pretraining epochs on the reference cells "
                   "before fine-tuning (transformer models; default: the preset's)")
    add_out(b, "output folder (must be new or empty unless --overwrite, which replaces it only once all succeeds)")
    add_no_progress(b)
    b.set_defaults(func=_cmd_benchmark)

    t = s.add_parser("train", help="train one annotator and save it",
                     description="Train one model on all cells of an .h5ad and save it for 'annotate predict'.")
    t.add_argument("--h5ad", required=True, help="reference AnnData with raw counts")
    _common(t)
    t.add_argument("--model", required=True, help=f"model to train ({names})")
    _model_opts(t)
    add_seed(t, "random seed of the model's initialisation and training (default 0)")
    add_out(t, "folder to save the model in (must be new or empty unless --overwrite, which replaces it whole "
            "once the new model is saved; nothing of the old one remains)")
    add_no_progress(t)
    t.set_defaults(func=_cmd_train)

    q = s.add_parser("predict", help="annotate a new .h5ad with a saved model",
                     description="Predict labels for every cell of an .h5ad; writes a new .h5ad with "
                     "obs['<model>_pred'], obsm['<model>_proba'] and obsm['X_<model>'] (never the input file).")
    q.add_argument("--model", "--model-dir", dest="model_dir", required=True,
                   help="folder written by 'biogen annotate train' (--model-dir: the older spelling)")
    q.add_argument("--h5ad", required=True, help="query AnnData with raw counts")
    add_out(q, "output .h5ad (must not exist unless --overwrite)")
    add_device(q)
    q.set_defaults(func=_cmd_predict)

    d = sub.add_parser("demo", help="the main job: the annotation benchmark on bundled real data",
                       description="Run the annotation benchmark on scanpy's bundled pbmc68k_reduced (real "
                       "PBMCs, counts recovered, 10 bulk_labels) with CPU-sized presets over --repeats seeded splits, "
                       "with paired significance tests between the models; writes a report "
                       "folder. Finishes in minutes on a laptop CPU.")
    add_out(d, "output folder (default biogen-demo; must be new or empty unless --overwrite)", default="biogen-demo")
    d.add_argument("--models", default="all", help=f"comma-separated models or 'all' (available: {names})")
    d.add_argument("--preset", default="small", help="transformer preset (default small)")
    add_seed(d)
    d.add_argument("--repeats", type=_positive_int, default=DEMO_REPEATS,
                   help=f"splits x seeds to average and compare over (default {DEMO_REPEATS})")
    add_device(d)
    add_no_progress(d)
    d.set_defaults(func=_cmd_demo)
