"""Every CLI subcommand against a table of broken inputs (issue 20).

Each row sets up a broken input and names the file the message must name. For every row: exit code
2, exactly one line on stderr naming that file, no traceback (and a traceback with ``--debug``), and
the outputs that existed before (a model folder, an earlier output, a checkpoint) unchanged byte for
byte. Ctrl-C is sent to real subprocesses: exit 130, one line saying what was kept, and the kept
checkpoint resumes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from biogen.cli import main
from biogen.sc.datasets import synthetic

ROOT = Path(__file__).resolve().parents[1]


def snapshot(path: Path) -> dict:
    """Relative path -> SHA-256 of every file under ``path`` (or of ``path`` itself)."""
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def assert_refused(argv, named, capsys, protected=(), code=2, must_say=None):
    """Run ``biogen argv``: one clean line naming ``named``, outputs in ``protected`` unchanged; then the
    same with --debug shows the traceback."""
    before = {p: snapshot(p) for p in protected}
    capsys.readouterr()  # what fixtures printed
    rc = main(list(argv))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(named) in lines[0], (named, err)
    if must_say:
        assert must_say in lines[0], err
    for p in protected:
        assert snapshot(p) == before[p], f"{p} was changed by a refused command"
    rc = main(["--debug", *argv])
    err = capsys.readouterr().err
    assert rc == code and "Traceback (most recent call last)" in err and str(named) in err.strip().splitlines()[-1]
    return lines[0]


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cli_errors")


@pytest.fixture(scope="module")
def ref(work):
    a = synthetic(n_cells=90, n_genes=50, n_types=3, n_donors=3, seed=5)
    a.obs["cell_type"] = a.obs["cell_type"].astype(str)
    path = work / "ref.h5ad"
    a.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def logreg_dir(work, ref):
    out = work / "logreg"
    assert main(["annotate", "train", "--h5ad", str(ref), "--label-key", "cell_type", "--model", "logreg",
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def scgpt_dir(work, ref):
    out = work / "scgpt"
    assert main(["annotate", "train", "--h5ad", str(ref), "--label-key", "cell_type", "--model", "scgpt",
                 "--preset", "tiny", "--epochs", "1", "--out", str(out)]) == 0
    return out


@pytest.fixture
def broken(tmp_path):
    """Makers of broken files in this test's folder."""

    class Broken:
        def empty(self, name):
            p = tmp_path / name
            p.write_bytes(b"")
            return p

        def text(self, name, content="this is not the expected format\n"):
            p = tmp_path / name
            p.write_text(content)
            return p

        def copy(self, src, name=None):
            dst = tmp_path / (name or Path(src).name)
            (shutil.copytree if Path(src).is_dir() else shutil.copy)(src, dst)
            return dst

        def missing(self, name):
            return tmp_path / name

    return Broken()


# ----------------------------------------------------------------------------- annotate predict


def _predict(model_dir, h5ad, out):
    return ["annotate", "predict", "--model", str(model_dir), "--h5ad", str(h5ad), "--out", str(out)]


def _model_case(case, src, broken):
    """A damaged copy of model folder ``src`` and the file the message must name."""
    d = broken.copy(src, "model")
    if case == "missing":
        shutil.rmtree(d)
        return d, d
    if case == "empty folder":
        shutil.rmtree(d)
        d.mkdir()
        return d, d
    if case == "not a folder":
        shutil.rmtree(d)
        d.write_text("x")
        return d, d
    target = {"manifest": d / "manifest.json", "annotator.json": d / "annotator.json"}.get(case.split(" ")[-1])
    if target is None:
        weights = sorted((d / "model").rglob("*.safetensors")) or sorted((d / "model").rglob("*.skops"))
        target = weights[0]
    if case.startswith("truncated"):
        truncate(target)
    elif case.startswith("zero-byte"):
        target.write_bytes(b"")
    elif case.startswith("corrupt"):
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif case.startswith("bad JSON"):
        target.write_text("{\n")
    return d, target


MODEL_CASES = ["missing", "empty folder", "not a folder", "truncated weights", "zero-byte weights",
               "corrupt weights", "zero-byte annotator.json", "bad JSON manifest"]


@pytest.mark.parametrize("case", MODEL_CASES)
@pytest.mark.parametrize("model", ["logreg", "scgpt"])
def test_predict_broken_model_folder(case, model, request, ref, broken, capsys, tmp_path):
    src = request.getfixturevalue(f"{model}_dir")
    d, named = _model_case(case, src, broken)
    assert_refused(_predict(d, ref, tmp_path / "pred.h5ad"), named, capsys, protected=[d])
    assert not (tmp_path / "pred.h5ad").exists()


def test_predict_wrong_model_type_and_legacy_pickle(logreg_dir, ref, broken, capsys, tmp_path):
    from biogen.checkpoint import save_training_state

    ck = tmp_path / "ckpt"  # a training checkpoint is a verified folder too, of another format
    lin = __import__("torch").nn.Linear(2, 2)
    save_training_state(ck, modules={"m": lin}, optimizers={}, generators={}, state={"epoch": 1})
    line = assert_refused(_predict(ck, ref, tmp_path / "p.h5ad"), ck, capsys, protected=[ck])
    assert "biogen.checkpoint" in line and "annotator model folder" in line
    old = broken.copy(logreg_dir, "old")
    shutil.rmtree(old / "model")
    (old / "manifest.json").unlink()
    (old / "model.pkl").write_bytes(b"\x80\x04N.")
    assert_refused(_predict(old, ref, tmp_path / "p.h5ad"), old / "model.pkl", capsys, must_say="pickle")


def _h5ad_case(case, ref, broken):
    if case == "missing":
        return broken.missing("q.h5ad")
    if case == "zero-byte":
        return broken.empty("q.h5ad")
    if case == "wrong format":
        return broken.text("q.h5ad", "gene,count\nA,1\n")
    if case == "wrong extension":
        return broken.text("q.csv", "gene,count\nA,1\n")
    if case == "truncated":
        p = broken.copy(ref, "q.h5ad")
        truncate(p)
        return p
    if case == "duplicate genes":
        import anndata as ad

        a = ad.read_h5ad(ref)
        names = list(a.var_names)
        names[3] = names[1]
        a.var_names = names
        p = broken.missing("q.h5ad")
        a.write_h5ad(p)
        return p
    raise AssertionError(case)


H5AD_CASES = ["missing", "zero-byte", "wrong format", "wrong extension", "truncated", "duplicate genes"]


@pytest.mark.parametrize("case", H5AD_CASES)
def test_predict_broken_query(case, logreg_dir, ref, broken, capsys, tmp_path):
    q = _h5ad_case(case, ref, broken)
    prev = tmp_path / "pred.h5ad"
    prev.write_text("an earlier output")
    line = assert_refused(_predict(logreg_dir, q, prev) + ["--overwrite"], q, capsys, protected=[prev, logreg_dir])
    if case == "duplicate genes":
        assert "more than once" in line


def test_predict_refuses_existing_output_and_its_own_input(logreg_dir, ref, capsys, tmp_path):
    prev = tmp_path / "pred.h5ad"
    prev.write_text("an earlier output")
    assert_refused(_predict(logreg_dir, ref, prev), prev, capsys, protected=[prev], must_say="--overwrite")
    assert_refused(_predict(logreg_dir, ref, ref), ref, capsys, protected=[ref])


# ------------------------------------------------------------------- annotate train / benchmark


@pytest.mark.parametrize("case", H5AD_CASES)
@pytest.mark.parametrize("sub", ["train", "benchmark"])
def test_train_and_benchmark_broken_reference(sub, case, ref, broken, capsys, tmp_path):
    h5ad = _h5ad_case(case, ref, broken)
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier output")
    argv = ["annotate", sub, "--h5ad", str(h5ad), "--label-key", "cell_type", "--out", str(out), "--overwrite"]
    argv += ["--model", "logreg"] if sub == "train" else ["--models", "logreg", "--no-progress"]
    assert_refused(argv, h5ad, capsys, protected=[out])


@pytest.mark.parametrize("sub", ["train", "benchmark"])
def test_train_and_benchmark_keep_an_existing_output(sub, ref, logreg_dir, broken, capsys):
    out = broken.copy(logreg_dir, "out")
    argv = ["annotate", sub, "--h5ad", str(ref), "--label-key", "cell_type", "--out", str(out)]
    argv += ["--model", "knn"] if sub == "train" else ["--models", "knn", "--no-progress"]
    assert_refused(argv, out, capsys, protected=[out], must_say="not empty")


def test_train_wrong_label_and_model(ref, capsys, tmp_path):
    base = ["annotate", "train", "--h5ad", str(ref), "--out", str(tmp_path / "o")]
    line = assert_refused(base + ["--label-key", "celltype", "--model", "logreg"], "celltype", capsys)
    assert "cell_type" in line
    assert_refused(base + ["--label-key", "cell_type", "--model", "nope"], "nope", capsys)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------- demos


@pytest.mark.parametrize("argv", [["demo"], ["tabular", "demo"]])
def test_demos_keep_an_existing_output(argv, capsys, tmp_path):
    folder = tmp_path / "demo_out"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    assert_refused(argv + ["--out", str(folder)], folder, capsys, protected=[folder])


# ----------------------------------------------------------------------------- tabular analyze


@pytest.mark.parametrize("case", ["missing", "zero-byte", "wrong format", "binary"])
def test_tabular_analyze_broken_csv(case, broken, capsys, tmp_path):
    csv = {"missing": lambda: broken.missing("d.csv"), "zero-byte": lambda: broken.empty("d.csv"),
           "wrong format": lambda: broken.text("d.csv", 'a,b\n1,"2\n'),
           "binary": lambda: _binary(broken.missing("d.csv"))}[case]()
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("keep")
    assert_refused(["tabular", "analyze", "--csv", str(csv), "--outcome", "y", "--out", str(out), "--overwrite"],
                   csv, capsys, protected=[out])


def _binary(path):
    path.write_bytes(bytes(range(256)) * 4)
    return path


# ------------------------------------------------------------------------------------- Ctrl-C


def _run_until(argv, ready, timeout=240):
    """Start ``biogen argv``, send SIGINT once ``ready()`` is true; return (exit code, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "biogen.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    t0 = time.monotonic()
    try:
        while not ready("".join(chunks)):
            assert proc.poll() is None, "".join(chunks)
            assert time.monotonic() - t0 < timeout, "never got ready: " + "".join(chunks)
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    proc.stdout.close()
    return proc.returncode, "".join(chunks)


def test_ctrl_c_during_annotate_train_keeps_the_previous_model(ref, logreg_dir, broken, capsys, tmp_path):
    out = broken.copy(logreg_dir, "model")
    before = snapshot(out)
    rc, err = _run_until(["annotate", "train", "--h5ad", str(ref), "--label-key", "cell_type", "--model", "scgpt",
                          "--preset", "tiny", "--epochs", "500", "--out", str(out), "--overwrite"],
                         ready=lambda err: "epoch=" in err)
    last = err.strip().splitlines()[-1]
    assert rc == 130, err
    assert "Traceback" not in err and last.startswith("biogen annotate train: interrupted: ")
    assert str(out) in last and "as it was" in last
    assert snapshot(out) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".model.")]
    assert main(_predict(out, ref, tmp_path / "p.h5ad")) == 0
