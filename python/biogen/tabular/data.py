"""Joining sources on a key with checks, and turning a table into a checked numeric design.

Policy for bad input (chosen so that nothing changes the analysis silently):

- non-numeric feature columns are refused, naming them and showing sample values: encoding a
  category changes what the L1 penalty shrinks (the reference level), so it must be a user decision;
  drop them with ``exclude`` (``--exclude``) or encode them before;
- missing values are reported per column and refused unless ``impute="median"`` (``--impute median``)
  is asked for; the outcome and the exposure are never imputed;
- a missing outcome column lists the available columns; a constant or negative outcome is refused;
- joins report every unmatched key (a warning here, a CSV and the report in the CLI), and refuse
  duplicate keys, which would silently multiply rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

__all__ = ["TabularInputError", "JoinReport", "join_sources", "PreparedData", "prepare_table"]


class TabularInputError(ValueError):
    """Input data that cannot be analysed as given; the message says what and how to fix it."""


def _avail(df: pd.DataFrame) -> str:
    return ", ".join(map(str, df.columns))


@dataclass
class JoinReport:
    """Outcome of :func:`join_sources`.

    keys: the key columns. n_rows: rows per source. n_matched: rows in the joined table.
    unmatched: (n_unmatched, len(keys) + 2) keys missing from at least one source, with the source
    they came from and the sources that lack them.
    """

    keys: list
    n_rows: dict
    n_matched: int
    unmatched: pd.DataFrame

    def summary(self) -> str:
        src = ", ".join(f"{k}: {v} rows" for k, v in self.n_rows.items())
        s = f"joined on {', '.join(self.keys)} ({src}) -> {self.n_matched} matched rows"
        if len(self.unmatched):
            s += f"; {len(self.unmatched)} unmatched key(s) left out of the analysis"
        return s


def join_sources(
    sources: Mapping[str, pd.DataFrame], keys: Sequence[str], *, strict: bool = False
) -> tuple[pd.DataFrame, JoinReport]:
    """Inner-join tables on ``keys`` and report every key that is not in all of them.

    Parameters
    ----------
    sources: name -> table; each must hold every key column, with unique key combinations.
    keys: key columns, e.g. ``["region", "year"]``.
    strict: raise :class:`TabularInputError` if any key is unmatched instead of warning.

    Returns
    -------
    joined: rows whose key is in every source, in the first source's order.
    report: :class:`JoinReport` listing the unmatched keys (never dropped without a report).
    """
    keys = list(keys)
    if not keys:
        raise TabularInputError("joining sources needs at least one key column (--key)")
    if len(sources) < 1:
        raise TabularInputError("no sources to join")
    seen: dict[str, str] = {}
    for name, df in sources.items():
        missing = [k for k in keys if k not in df.columns]
        if missing:
            raise TabularInputError(
                f"source {name!r} lacks key column(s) {missing}; available columns: {_avail(df)}")
        dup = df.duplicated(subset=keys, keep=False)
        if dup.any():
            ex = df.loc[dup, keys].drop_duplicates().head(3).to_dict("records")
            raise TabularInputError(
                f"source {name!r} has {int(dup.sum())} rows with duplicated keys {keys} (e.g. {ex}); "
                "aggregate them first, a join would multiply rows")
        for col in df.columns:
            if col in keys:
                continue
            if col in seen:
                raise TabularInputError(
                    f"column {col!r} is in both source {seen[col]!r} and source {name!r}; rename or drop one")
            seen[col] = name
    names = list(sources)
    first = sources[names[0]]
    for name in names[1:]:
        for k in keys:
            a, b = first[k], sources[name][k]
            if pd.api.types.is_numeric_dtype(a) != pd.api.types.is_numeric_dtype(b):
                raise TabularInputError(
                    f"key {k!r} is {a.dtype} in source {names[0]!r} but {b.dtype} in source {name!r}; "
                    "make the key types agree")

    key_sets = {name: pd.MultiIndex.from_frame(df[keys]) for name, df in sources.items()}
    common = key_sets[names[0]]
    for name in names[1:]:
        common = common.intersection(key_sets[name])
    rows = []
    for name, idx in key_sets.items():
        out = ~idx.isin(common)
        if out.any():
            part = sources[name].loc[out, keys].copy()
            lacking = []
            for tup in idx[out]:
                lacking.append(", ".join(n for n in names if tup not in key_sets[n]))
            part["source"] = name
            part["missing_from"] = lacking
            rows.append(part)
    unmatched = (pd.concat(rows, ignore_index=True) if rows
                 else pd.DataFrame(columns=keys + ["source", "missing_from"]))

    joined = sources[names[0]]
    for name in names[1:]:
        joined = joined.merge(sources[name], on=keys, how="inner", validate="one_to_one")
    joined = joined.reset_index(drop=True)
    report = JoinReport(keys=keys, n_rows={n: len(d) for n, d in sources.items()},
                        n_matched=len(joined), unmatched=unmatched)
    if len(unmatched):
        msg = (f"{len(unmatched)} key(s) are not in every source and are left out: "
               f"{unmatched.head(5).to_dict('records')}{' ...' if len(unmatched) > 5 else ''}")
        if strict:
            raise TabularInputError(msg + " (strict join)")
        warnings.warn(msg, stacklevel=2)
    if len(joined) == 0:
        raise TabularInputError(f"no key is present in every source; {report.summary()}")
    return joined, report


@dataclass
class PreparedData:
    """A checked numeric design.

    X: (n_rows, n_features) float features. y: (n_rows,) outcome counts. exposure: (n_rows,) or None.
    groups: (n_rows,) labels of the first key (for grouped CV / bootstrap) or None.
    missing: column -> number of missing values found. imputed: column -> median used.
    dropped_constant: constant feature columns that were left out. notes: what was done, for the report.
    """

    X: pd.DataFrame
    y: np.ndarray
    exposure: Optional[np.ndarray]
    groups: Optional[np.ndarray]
    missing: dict = field(default_factory=dict)
    imputed: dict = field(default_factory=dict)
    dropped_constant: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def prepare_table(
    df: pd.DataFrame,
    outcome: str,
    *,
    keys: Sequence[str] = (),
    exposure: Optional[str] = None,
    exclude: Sequence[str] = (),
    impute: Optional[str] = None,
    min_rows: int = 20,
) -> PreparedData:
    """Check a table and split it into features, outcome, exposure and groups.

    Every column that is not the outcome, the exposure, a key or excluded is a feature and must be
    numeric. See the module docstring for the bad-input policy.

    Parameters
    ----------
    df: (n_rows, n_columns) table.
    outcome: count column (non-negative, not constant, no missing values).
    keys: identifier columns, not features; the first one groups rows (e.g. region) for CV/bootstrap.
    exposure: population-at-risk column (positive); the models use ``log(exposure)`` as offset.
    exclude: further columns to leave out.
    impute: ``None`` (missing feature values are an error) or ``"median"``.
    """
    if impute not in (None, "median"):
        raise TabularInputError(f"impute must be None or 'median', got {impute!r}")
    if outcome not in df.columns:
        raise TabularInputError(f"outcome column {outcome!r} not found; available columns: {_avail(df)}")
    for what, cols in (("key", list(keys)), ("exposure", [exposure] if exposure else []),
                       ("exclude", list(exclude))):
        bad = [c for c in cols if c not in df.columns]
        if bad:
            raise TabularInputError(f"{what} column(s) {bad} not found; available columns: {_avail(df)}")
    if exposure == outcome or outcome in keys:
        raise TabularInputError(f"outcome column {outcome!r} cannot also be the exposure or a key")
    if len(df) < min_rows:
        raise TabularInputError(f"need at least {min_rows} rows, got {len(df)}")

    def numeric_column(col: str, what: str) -> np.ndarray:
        s = df[col]
        if not (pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)):
            raise TabularInputError(
                f"{what} column {col!r} is not numeric (dtype {s.dtype}, e.g. {s.dropna().head(3).tolist()})")
        v = s.to_numpy(dtype=float)
        n_miss = int(np.isnan(v).sum())
        if n_miss:
            raise TabularInputError(
                f"{what} column {col!r} has {n_miss} missing value(s); they are never imputed, "
                "remove those rows")
        if not np.isfinite(v).all():
            raise TabularInputError(f"{what} column {col!r} has infinite values")
        return v

    y = numeric_column(outcome, "outcome")
    if (y < 0).any():
        raise TabularInputError(f"outcome column {outcome!r} has negative values; counts must be >= 0")
    if np.ptp(y) == 0:
        raise TabularInputError(f"outcome column {outcome!r} is constant ({y[0]:g}); nothing to explain")
    expo = None
    if exposure:
        expo = numeric_column(exposure, "exposure")
        if (expo <= 0).any():
            raise TabularInputError(f"exposure column {exposure!r} must be > 0 (it enters as log(exposure))")

    skip = {outcome, *(keys or ()), *(exclude or ())} | ({exposure} if exposure else set())
    feats = [c for c in df.columns if c not in skip]
    if not feats:
        raise TabularInputError(
            f"no feature columns left after removing outcome, exposure, keys and excluded columns; "
            f"available columns: {_avail(df)}")
    non_num = [c for c in feats
               if not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])]
    if non_num:
        ex = "; ".join(f"{c!r} ({df[c].dtype}, e.g. {df[c].dropna().astype(str).head(3).tolist()})"
                       for c in non_num)
        raise TabularInputError(
            f"non-numeric feature column(s): {ex}. They are refused rather than encoded silently: "
            "leave them out with --exclude COL (exclude=[...]) or encode them numerically first")
    X = df[feats].astype(float).reset_index(drop=True)
    notes = []
    missing = {c: int(v) for c, v in X.isna().sum().items() if v}
    imputed = {}
    if missing:
        desc = ", ".join(f"{c} ({v})" for c, v in missing.items())
        if impute is None:
            raise TabularInputError(
                f"missing values in feature column(s): {desc}; pass --impute median (impute='median') "
                "to fill them with column medians, or remove those rows")
        for c in missing:
            med = float(X[c].median())
            if np.isnan(med):
                raise TabularInputError(f"feature column {c!r} has no values at all; exclude it")
            X[c] = X[c].fillna(med)
            imputed[c] = med
        notes.append(f"imputed missing values with column medians: {desc}")
    inf = [c for c in feats if not np.isfinite(X[c].to_numpy()).all()]
    if inf:
        raise TabularInputError(f"infinite values in feature column(s): {inf}")
    const = [c for c in feats if np.ptp(X[c].to_numpy()) == 0]
    if const:
        X = X.drop(columns=const)
        notes.append(f"left out constant feature column(s): {', '.join(const)}")
        if X.shape[1] == 0:
            raise TabularInputError(f"every feature column is constant: {const}")
    groups = df[keys[0]].to_numpy() if keys else None
    return PreparedData(X=X, y=y, exposure=expo, groups=groups, missing=missing, imputed=imputed,
                        dropped_constant=const, notes=notes)
