"""Joins report unmatched keys; bad input is refused with messages that say what and how."""

import numpy as np
import pandas as pd
import pytest

from biogen.tabular import TabularInputError, join_sources, prepare_table


def test_join_reports_every_unmatched_key(synth):
    with pytest.warns(UserWarning, match="not in every source"):
        joined, rep = join_sources(synth.sources, ["region", "year"])
    planted = set(map(tuple, synth.unmatched[["region", "year"]].to_numpy()))
    reported = set(map(tuple, rep.unmatched[["region", "year"]].to_numpy()))
    assert reported == planted
    assert len(joined) == rep.n_matched == len(synth.merged)
    # Each unmatched key says which sources lack it; none of them is in the joined table.
    lacking = rep.unmatched.set_index(["region", "year"])["missing_from"]
    assert all("pollution" in v for v in lacking)
    assert not set(map(tuple, joined[["region", "year"]].to_numpy())) & planted
    pd.testing.assert_frame_equal(joined, synth.merged)
    with pytest.raises(TabularInputError, match="strict"):
        join_sources(synth.sources, ["region", "year"], strict=True)


def test_join_refuses_duplicates_overlaps_and_missing_keys():
    a = pd.DataFrame({"region": ["A", "A", "B"], "year": [1, 1, 1], "x": [1, 2, 3]})
    b = pd.DataFrame({"region": ["A", "B"], "year": [1, 1], "y": [1, 2]})
    with pytest.raises(TabularInputError, match="duplicated keys"):
        join_sources({"a": a, "b": b}, ["region", "year"])
    with pytest.raises(TabularInputError, match="column 'y' is in both"):
        join_sources({"b": b, "c": b.copy()}, ["region", "year"])
    with pytest.raises(TabularInputError, match="source 'a' lacks key column.*'month'.*available columns: region, year, x"):
        join_sources({"a": a.drop_duplicates(["region", "year"]), "b": b}, ["region", "month"])
    with pytest.raises(TabularInputError, match="key 'year' is int64.*object"):
        join_sources({"a": a.iloc[1:], "b": b.assign(year=["1", "1"])}, ["region", "year"])


def _table(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"region": [f"R{i}" for i in range(n)], "cases": rng.poisson(5, n),
                         "pop": rng.integers(100, 1000, n), "a": rng.standard_normal(n),
                         "b": rng.standard_normal(n)})


def test_missing_outcome_lists_available_columns():
    with pytest.raises(TabularInputError, match=r"'hosp' not found; available columns: region, cases, pop, a, b"):
        prepare_table(_table(), "hosp")


def test_constant_negative_and_missing_outcome_refused():
    with pytest.raises(TabularInputError, match="constant"):
        prepare_table(_table().assign(cases=3), "cases")
    with pytest.raises(TabularInputError, match="negative"):
        prepare_table(_table().assign(cases=lambda d: d.cases - 10), "cases")
    t = _table()
    t.loc[3, "cases"] = np.nan
    with pytest.raises(TabularInputError, match="outcome column 'cases' has 1 missing.*never imputed"):
        prepare_table(t, "cases", impute="median")
    with pytest.raises(TabularInputError, match="exposure column 'pop' must be > 0"):
        prepare_table(_table().assign(pop=0), "cases", exposure="pop")


def test_non_numeric_features_refused_unless_excluded():
    t = _table().assign(state=["north", "south"] * 20)
    with pytest.raises(TabularInputError, match=r"non-numeric feature column\(s\): 'state'.*--exclude"):
        prepare_table(t, "cases", keys=["region"])
    d = prepare_table(t, "cases", keys=["region"], exposure="pop", exclude=["state"])
    assert list(d.X.columns) == ["a", "b"]
    np.testing.assert_array_equal(d.groups, t["region"])


def test_missing_values_reported_and_imputed_only_when_asked():
    t = _table()
    t.loc[[1, 5], "a"] = np.nan
    t.loc[7, "b"] = np.nan
    with pytest.raises(TabularInputError, match=r"a \(2\), b \(1\).*--impute median"):
        prepare_table(t, "cases", keys=["region"])
    d = prepare_table(t, "cases", keys=["region"], impute="median")
    assert d.missing == {"a": 2, "b": 1}
    assert d.X.loc[1, "a"] == d.X.loc[5, "a"] == np.nanmedian(t["a"])
    assert d.X.loc[7, "b"] == np.nanmedian(t["b"])
    assert not d.X.isna().any().any()


def test_constant_feature_left_out_with_a_note():
    d = prepare_table(_table().assign(c=1.0), "cases", keys=["region"])
    assert "c" not in d.X.columns and d.dropped_constant == ["c"]
    assert any("constant" in n for n in d.notes)
