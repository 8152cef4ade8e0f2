"""Every annotator saved by ``annotate train`` loads in ``annotate predict``, also over another model's
folder with --overwrite; baselines are saved without pickle and load only allow-listed types."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest

from biogen.cli import main
from biogen.sc.benchmark import ANNOTATORS, load_baseline, save_baseline
from biogen.sc.datasets import synthetic

BASELINES = sorted(name for name, f in ANNOTATORS.items() if isinstance(f, type))
# scGPT first, then the baselines: the order of issue 20's crash (logreg over a scGPT folder)
CHAIN = ["scgpt"] + BASELINES + ["scbert"]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    a = synthetic(n_cells=120, n_genes=60, n_types=3, n_donors=2, seed=3)
    a.obs["cell_type"] = a.obs["cell_type"].astype(str)
    path = tmp_path_factory.mktemp("ref") / "ref.h5ad"
    a.write_h5ad(path)
    return a, path


def _train(ref_path, model, out, *extra):
    return main(["annotate", "train", "--h5ad", str(ref_path), "--label-key", "cell_type", "--model", model,
                 "--preset", "tiny", "--epochs", "1", "--out", str(out), *extra])


def _files(folder):
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_every_model_trains_predicts_and_overwrites_another_models_folder(ref, tmp_path):
    import anndata as ad

    adata, ref_path = ref
    assert set(CHAIN) == set(ANNOTATORS), "a registered model is missing from the matrix"
    out = tmp_path / "model"
    previous = None
    for model in CHAIN:
        if previous is not None:
            # leftovers a partial replacement would keep: the last model's files plus two planted ones
            (out / "stale.txt").write_text("old")
            (out / "model" / "stale.txt").write_text("old")
            before = _files(out)
            assert _train(ref_path, model, out) == 2, "a non-empty folder needs --overwrite"
            assert _files(out) == before
        assert _train(ref_path, model, out, "--overwrite") == 0
        files = _files(out)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["format"] == "biogen.annotator" and manifest["model"] == model
        assert files == set(manifest["files"]) | {"manifest.json"}
        assert "stale.txt" not in files and "model/stale.txt" not in files
        if model in BASELINES:
            assert files == {"annotator.json", "manifest.json", "model/annotator.skops"}
        assert not [p for p in out.parent.iterdir() if p.name.startswith(".model.")], "temporary folder left"
        pred = tmp_path / f"{model}.h5ad"
        assert main(["annotate", "predict", "--model", str(out), "--h5ad", str(ref_path), "--out", str(pred)]) == 0
        got = ad.read_h5ad(pred)
        assert len(got.obs[f"{model}_pred"]) == adata.n_obs
        assert set(got.obs[f"{model}_pred"]) <= set(adata.obs["cell_type"])
        if model in ("logreg", "knn", "scgpt", "scbert") or f"{model}_proba" in got.obsm:  # (a linear SVM has none)
            proba = got.obsm[f"{model}_proba"]
            assert np.allclose(proba.sum(1), 1, atol=1e-4)
        previous = model


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_save_load_predicts_exactly_as_the_fitted_model(ref, tmp_path, name):
    adata, _ = ref
    model = ANNOTATORS[name](n_top_genes=40)
    model.fit(adata, "cell_type")
    want = model.predict(adata)
    save_baseline(model, tmp_path)  # what 'annotate train' does for every baseline, with or without a save()
    with open(tmp_path / "annotator.skops", "rb") as f:
        assert f.read(2) == b"PK", "a skops zip, not a pickle"
    loaded = load_baseline(tmp_path, ANNOTATORS[name])
    got = loaded.predict(adata)
    assert type(loaded) is type(model)
    assert list(got.labels) == list(want.labels)
    assert (got.proba is None) == (want.proba is None)
    if want.proba is not None:
        assert np.array_equal(got.proba, want.proba)
    assert got.classes == want.classes
    if want.embedding is not None:
        assert np.array_equal(got.embedding, want.embedding)
    other = next((n for n in BASELINES if n != name), None)
    if other is not None:
        with pytest.raises(ValueError, match=f"holds a {type(model).__name__}, not a"):
            load_baseline(tmp_path, ANNOTATORS[other])


class _Planted:
    """Unpickling this creates a file: what a malicious model.pkl could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_model_folder_cannot_run_code(ref, tmp_path, capsys):
    import skops.io as sio

    from biogen._io import write_manifest

    _, ref_path = ref
    out = tmp_path / "m"
    assert _train(ref_path, "logreg", out) == 0
    # an old-style pickle folder: refused by name, never unpickled
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(out / "annotator.json", legacy / "annotator.json")
    marker = tmp_path / "ran"
    (legacy / "model.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    rc = main(["annotate", "predict", "--model", str(legacy), "--h5ad", str(ref_path), "--out", str(tmp_path / "p.h5ad")])
    err = capsys.readouterr().err
    assert rc == 2 and "model.pkl" in err and "pickle" in err and "Traceback" not in err
    assert not marker.exists()
    # a skops file holding a type outside the allow-list (a function that runs commands), with a
    # manifest rewritten to match: the checksum is integrity, the allow-list is the safety
    sio.dump({"model": os.system}, out / "model" / "annotator.skops")
    write_manifest(out, "biogen.annotator", 1, model="logreg")
    rc = main(["annotate", "predict", "--model", str(out), "--h5ad", str(ref_path), "--out", str(tmp_path / "p.h5ad")])
    err = capsys.readouterr().err
    assert rc == 2 and "annotator.skops" in err and "does not load" in err and "system" in err
    assert not (tmp_path / "p.h5ad").exists()
