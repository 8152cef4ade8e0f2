"""``biogen tabular analyze`` and ``biogen tabular demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cliargs import add_out, add_seed, command_group

__all__ = ["add_cli"]


def _split_cols(values) -> tuple:
    out = []
    for v in values or ():
        out += [c.strip() for c in v.split(",") if c.strip()]
    return tuple(out)


def _config(args, **over):
    from .analysis import AnalysisConfig

    kw = dict(
        outcome=args.outcome, keys=tuple(args.key or ()), exposure=args.exposure,
        factor_cols=_split_cols(args.factor_cols), n_factors=args.n_factors,
        exclude=_split_cols(args.exclude), impute=args.impute, rule=args.rule, n_folds=args.folds,
        n_bootstrap=args.n_bootstrap, top_k=args.top_k, strict_join=args.strict_join, random_state=args.seed,
    )
    kw.update(over)
    return AnalysisConfig(**kw)


def _print_summary(res, out: Path) -> None:
    if res.join is not None:
        print(res.join.summary(), file=sys.stderr if len(res.join.unmatched) else sys.stdout)
    for note in res.data.notes:
        print(note)
    print(f"L1 Poisson selected: {', '.join(res.l1.selected) or 'none'} (lambda {res.l1.lam:.3g})")
    print(f"gradient boosting: held-out deviance explained {res.boosting.heldout_d2:.3f}; top: "
          + ", ".join(res.boosting.importance['feature'].head(4)))
    print(f"wrote {len(res.files)} files to {out} (see {out / 'report.md'})")


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .._io import read_csv
    from .analysis import check_output_dir, run_analysis

    cfg = _config(args)  # validates the options before reading anything
    check_output_dir(args.out, args.overwrite)
    sources = {}
    for path in args.csv:
        p = Path(path)
        name = p.stem
        while name in sources:
            name += "_"
        sources[name] = read_csv(p, what="--csv file")
    if len(sources) > 1 and not cfg.keys:
        raise ValueError("several --csv files need --key columns to join them on")
    res = run_analysis(sources, cfg, args.out, overwrite=args.overwrite)
    _print_summary(res, Path(args.out))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .analysis import AnalysisConfig, _Writer, check_output_dir, run_analysis
    from .synthetic import make_synthetic_health_data

    out = check_output_dir(args.out, args.overwrite)
    d = make_synthetic_health_data(n_regions=args.n_regions, n_years=args.n_years, seed=args.seed)
    w = _Writer(out / "data")
    for name, df in d.sources.items():
        w.csv(f"{name}.csv", df)
    truth = {
        "factor_loadings": d.truth.loadings.round(3).to_dict(),
        "factor_effects_per_sd": d.truth.factor_effects,
        "linear_effects_per_sd": d.truth.linear_effects,
        "noise_columns": list(d.truth.noise),
        "nonlinear_column": d.truth.nonlinear,
        "nonlinear_effect": "0.3 * ((1 - exp(-t^2/2)) - (1 - 1/sqrt(2))), t = (temperature - 18) / 5",
        "unmatched_keys": d.unmatched.to_dict("records"),
    }
    w.text("truth.json", json.dumps(truth, indent=2, default=str))
    cfg = AnalysisConfig(
        outcome="hospitalizations", keys=("region", "year"), exposure="population",
        factor_cols=tuple(d.truth.loadings.index), n_bootstrap=args.n_bootstrap, random_state=args.seed,
    )
    res = run_analysis(d.sources, cfg, out, overwrite=True)  # the folder was checked above
    print(f"synthetic sources and the planted truth are in {out / 'data'}")
    _print_summary(res, out)
    return 0


def add_cli(sub) -> None:
    tsub = command_group(
        sub, "tabular", metavar="SUBCOMMAND",
        help="multifactorial analysis of health outcomes (factor analysis, L1 Poisson, boosting)",
        description="Study a count outcome (e.g. hospitalisations) against socio-economic indices and "
        "pollutants: factor analysis of an index block, L1-penalised Poisson regression with "
        "cross-validated strength and bootstrap selection frequency, and Poisson gradient boosting "
        "with permutation importance and partial dependence.",
    )

    a = tsub.add_parser(
        "analyze", help="analyse one or more CSV files and write tables, plots and report.md",
        description="Join the CSV files on the --key columns (unmatched keys are reported in "
        "join_unmatched.csv and the report, never dropped silently), check the table, then run "
        "the factor analysis, the L1 Poisson regression and gradient boosting. Every column that is "
        "not the outcome, the exposure, a key or excluded is an explanatory variable and must be "
        "numeric (non-numeric columns are refused: --exclude them or encode them first).",
    )
    a.add_argument("--csv", action="append", required=True, metavar="FILE",
                   help="input CSV; repeat to join several sources on the --key columns")
    a.add_argument("--outcome", required=True, help="count column to explain (e.g. hospitalizations)")
    a.add_argument("--key", action="append", metavar="COL",
                   help="key column (repeat: --key region --key year); the first groups rows for "
                   "cross-validation and bootstrap")
    a.add_argument("--exposure", metavar="COL",
                   help="population-at-risk column; the models explain the rate outcome/exposure")
    a.add_argument("--factor-cols", nargs="+", metavar="COL",
                   help="index columns to factor-analyse (space or comma separated); they are "
                   "replaced by the factor scores F1..Fk")
    a.add_argument("--n-factors", type=int, metavar="K",
                   help="number of factors (default: Kaiser rule, eigenvalues > 1)")
    a.add_argument("--exclude", nargs="+", metavar="COL", help="columns to leave out of the analysis")
    a.add_argument("--impute", choices=["median"],
                   help="fill missing explanatory values with column medians (default: refuse them)")
    a.add_argument("--rule", choices=["1se", "min"], default="1se",
                   help="penalty choice: strongest within one SE of the best CV deviance (1se, default) "
                   "or the best (min)")
    a.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    a.add_argument("--n-bootstrap", type=int, default=100,
                   help="bootstrap refits for selection frequency and intervals (default 100; 0 skips)")
    a.add_argument("--top-k", type=int, default=4, help="partial-dependence plots for the top K variables (default 4)")
    a.add_argument("--strict-join", action="store_true", help="fail instead of reporting unmatched keys")
    add_seed(a, "random seed for folds, bootstrap and boosting (default 0)")
    add_out(a, "output folder (must be empty or absent unless --overwrite, which replaces files of the same name)")
    a.set_defaults(func=_cmd_analyze)

    d = tsub.add_parser(
        "demo", help="run the analysis on synthetic data with planted effects",
        description="Generate hospitalisations, population, census indices (from two latent factors) "
        "and pollutants for regions x years with known effects (pm25 and one socio-economic factor "
        "linear, temperature U-shaped, no2/co/so2 noise, no2 collinear with pm25), write them and the "
        "truth to DIR/data, and analyse them as `analyze` would.",
    )
    add_out(d, "output folder (default ./biogen-tabular-demo; must be empty or absent unless --overwrite)",
            default="biogen-tabular-demo")
    d.add_argument("--n-regions", type=int, default=80, help="regions (default 80)")
    d.add_argument("--n-years", type=int, default=5, help="years per region (default 5)")
    d.add_argument("--n-bootstrap", type=int, default=100, help="bootstrap refits (default 100)")
    add_seed(d, "seed of the generator and the analysis (default 0)")
    d.set_defaults(func=_cmd_demo)
