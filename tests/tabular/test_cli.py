"""``biogen tabular`` end to end, in-process."""

import json

import numpy as np
import pandas as pd
import pytest

from biogen.cli import main

INDICES = ["illiteracy", "no_primary_school", "no_health_insurance", "informal_work",
           "dirt_floor", "no_drainage", "no_piped_water", "overcrowding"]


@pytest.mark.parametrize("argv", [["tabular", "--help"], ["tabular", "analyze", "--help"],
                                  ["tabular", "demo", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: biogen tabular" in out
    if "analyze" in argv:
        for opt in ("--csv", "--outcome", "--key", "--exposure", "--factor-cols", "--impute", "--overwrite"):
            assert opt in out


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    rc = main(["tabular", "demo", "--out", str(out), "--n-regions", "50", "--n-bootstrap", "10"])
    assert rc == 0
    return out


def test_demo_writes_tables_plots_and_report(demo_dir):
    for name in ("report.md", "factor_loadings.csv", "factor_scree.png", "l1_poisson_coefficients.csv",
                 "l1_poisson_cv.csv", "l1_poisson_path.png", "l1_poisson_rate_ratios.png",
                 "gbm_importance.csv", "gbm_partial_dependence.png", "gbm_partial_dependence.csv",
                 "join_unmatched.csv", "data/hospital.csv", "data/truth.json"):
        assert (demo_dir / name).stat().st_size > 0, name
    assert not list(demo_dir.glob(".*.tmp"))  # atomic writes leave no temporaries
    for png in demo_dir.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    truth = json.loads((demo_dir / "data" / "truth.json").read_text())
    unmatched = pd.read_csv(demo_dir / "join_unmatched.csv")
    planted = {(k["region"], k["year"]) for k in truth["unmatched_keys"]}
    assert set(zip(unmatched["region"], unmatched["year"])) == planted
    coef = pd.read_csv(demo_dir / "l1_poisson_coefficients.csv")
    assert "pm25" in set(coef.loc[coef["selected"], "variable"])
    assert "unmatched" in (demo_dir / "report.md").read_text()


def test_refuses_non_empty_output_dir(demo_dir, capsys):
    rc = main(["tabular", "demo", "--out", str(demo_dir)])
    assert rc == 2 and "not empty" in capsys.readouterr().err


def _csvs(demo_dir):
    return [a for n in ("hospital", "census", "pollution") for a in ("--csv", str(demo_dir / "data" / f"{n}.csv"))]


def test_analyze_missing_values_refused_then_imputed(demo_dir, tmp_path, capsys):
    poll = pd.read_csv(demo_dir / "data" / "pollution.csv")
    poll.loc[[2, 9], "so2"] = np.nan
    poll.to_csv(tmp_path / "pollution.csv", index=False)
    csvs = _csvs(demo_dir)
    csvs[-1] = str(tmp_path / "pollution.csv")
    base = ["tabular", "analyze", *csvs, "--outcome", "hospitalizations", "--key", "region", "--key", "year",
            "--exposure", "population", "--factor-cols", ",".join(INDICES), "--n-bootstrap", "3"]
    rc = main(base + ["--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 2 and "so2 (2)" in err and "--impute median" in err
    assert not (tmp_path / "a").exists()  # refused before writing anything
    rc = main(base + ["--impute", "median", "--top-k", "2", "--out", str(tmp_path / "b")])
    assert rc == 0
    miss = pd.read_csv(tmp_path / "b" / "missing_values.csv")
    assert miss.to_dict("records")[0]["n_missing"] == 2
    assert len(pd.read_csv(tmp_path / "b" / "factor_loadings.csv")) == len(INDICES)


@pytest.mark.parametrize("extra, message", [
    (["--outcome", "hosp"], "'hosp' not found; available columns: region, year, hospitalizations"),
    (["--outcome", "population"], "constant"),
    (["--outcome", "hospitalizations", "--csv-extra"], "non-numeric feature column(s): 'label'"),
])
def test_analyze_bad_input_exit_code(tmp_path, capsys, extra, message):
    rng = np.random.default_rng(0)
    t = pd.DataFrame({"region": [f"R{i}" for i in range(30)], "year": 2020,
                      "hospitalizations": rng.poisson(5, 30), "population": 1000, "x": rng.standard_normal(30)})
    if "--csv-extra" in extra:
        extra = extra[:-1]
        t["label"] = "a"
    t.to_csv(tmp_path / "t.csv", index=False)
    rc = main(["tabular", "analyze", "--csv", str(tmp_path / "t.csv"), "--key", "region",
               "--out", str(tmp_path / "o"), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
