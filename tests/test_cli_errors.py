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


# ----------------------------------------------------------------------------- model fixtures


@pytest.fixture(scope="module")
def ts_run(work):
    """A one-epoch TumorSynth run at 32 px (checkpoints/last, best_generator.safetensors)."""
    from biogen.data.phantoms import brain_phantoms
    from biogen.models.tumorsynth.training import TumorSynthConfig, train

    images, labels = brain_phantoms(24, size=32, seed=0)
    train(images, labels, config=TumorSynthConfig(image_size=32, epochs=1, n_eval_samples=16, batch_size=4),
          out_dir=work / "ts", progress=False)
    return work / "ts"


@pytest.fixture(scope="module")
def cxr(work):
    from biogen.models.pumamednet.data import make_synthetic_cxr, write_synthetic_folder

    return write_synthetic_folder(make_synthetic_cxr(24, size=32, seed=0), work / "cxr")


@pytest.fixture(scope="module")
def pm_run(work, cxr):
    out = work / "pm"
    assert main(["pumamednet", "train", "--data", str(cxr), "--out", str(out), "--preset", "tiny", "--epochs", "1",
                 "--clf-epochs", "3", "--no-attention", "--val-fraction", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def rna(work):
    from biogen.data.toy_tissue import ToyTissueConfig, simulate_toy_tissue

    toy = simulate_toy_tissue(12, 1, ToyTissueConfig(n_genes=40, markers_per_type=5, tile_size=32), seed=3)
    toy.write(work / "rna.h5ad", work / "tiles")
    return work / "rna.h5ad", work / "tiles"


@pytest.fixture(scope="module")
def rna_runs(work, rna):
    h5ad, tiles = rna
    vae_dir, cdm_dir = work / "vae", work / "cdm"
    assert main(["rnacdm", "train-vae", "--rna", str(h5ad), "--out", str(vae_dir), "--hidden", "16", "--latent", "4",
                 "--epochs", "2", "--batch-size", "8", "--plot", "none"]) == 0
    assert main(["rnacdm", "train", "--rna", str(h5ad), "--tiles", str(tiles), "--vae", str(vae_dir / "vae.safetensors"),
                 "--preset", "tiny", "--steps", "1", "--batch-size", "4", "--out", str(cdm_dir)]) == 0
    return vae_dir, cdm_dir


def _damage(path: Path, how: str) -> Path:
    if how == "truncated":
        truncate(path)
    elif how == "zero-byte":
        path.write_bytes(b"")
    elif how == "bad JSON":
        path.write_text("{\n")
    elif how == "bit flip":
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x10
        path.write_bytes(bytes(data))
    else:
        raise AssertionError(how)
    return path


# --------------------------------------------------------------------------------- tumorsynth


TS_CASES = [("missing", None), ("empty folder", None), ("truncated", "best_generator.safetensors"),
            ("zero-byte", "checkpoints/last/generator.safetensors"), ("bad JSON", "checkpoints/last/state.json"),
            ("bit flip", "best_generator.safetensors"), ("truncated", "checkpoints/last/manifest.json")]


@pytest.mark.parametrize("how,rel", TS_CASES)
def test_tumorsynth_sample_broken_run(how, rel, ts_run, broken, capsys, tmp_path):
    run = broken.copy(ts_run, "run")
    if how == "missing":
        shutil.rmtree(run)
        named = run
    elif how == "empty folder":
        shutil.rmtree(run)
        run.mkdir()
        named = run
    else:
        named = _damage(run / rel, how)
    argv = ["tumorsynth", "sample", "--run", str(run), "--n", "2", "--out", str(tmp_path / "s.png")]
    if "generator.safetensors" in str(rel) and "checkpoints" in str(rel):
        argv.append("--last")
    assert_refused(argv, named, capsys, protected=[run])
    assert not (tmp_path / "s.png").exists()


def test_tumorsynth_wrong_model_type_and_train_inputs(ts_run, pm_run, broken, capsys, tmp_path):
    line = assert_refused(["tumorsynth", "sample", "--run", str(pm_run), "--out", str(tmp_path / "s.png")], pm_run,
                          capsys, protected=[pm_run])
    assert "no TumorSynth checkpoint" in line
    run = broken.copy(ts_run, "run")
    _damage(run / "checkpoints" / "last" / "optim.pt", "truncated")
    assert_refused(["tumorsynth", "train", "--out", str(run), "--resume", "--image-size", "32", "--phantoms", "24",
                    "--epochs", "2", "--no-progress"], run / "checkpoints" / "last" / "optim.pt", capsys,
                   protected=[run])
    missing = tmp_path / "no_images"
    assert_refused(["tumorsynth", "train", "--data", str(missing), "--out", str(tmp_path / "o"), "--image-size", "32"],
                   missing, capsys)
    assert_refused(["tumorsynth", "evaluate", "--real", str(missing), "--fake", str(ts_run), "--image-size", "32"],
                   missing, capsys)


# --------------------------------------------------------------------------------- pumamednet


@pytest.mark.parametrize("how,rel", [("missing", None), ("truncated", "model/model.safetensors"),
                                     ("zero-byte", "model/config.json"), ("bit flip", "model/model.safetensors")])
@pytest.mark.parametrize("sub", ["explain", "audit"])
def test_pumamednet_broken_model(sub, how, rel, pm_run, cxr, broken, capsys, tmp_path):
    run = broken.copy(pm_run, "run")
    if how == "missing":
        shutil.rmtree(run / "model")
        named = run / "model"
    else:
        named = _damage(run / rel, how)
    out = tmp_path / "out"
    assert_refused(["pumamednet", sub, "--model", str(run / "model"), "--data", str(cxr), "--out", str(out)], named,
                   capsys, protected=[run])
    assert not out.exists() or not any(out.iterdir())


def test_pumamednet_wrong_model_type_and_broken_resume(pm_run, ts_run, cxr, broken, capsys, tmp_path):
    line = assert_refused(["pumamednet", "explain", "--model", str(ts_run), "--data", str(cxr), "--out",
                           str(tmp_path / "o")], ts_run, capsys, protected=[ts_run])
    assert "manifest.json" in line
    run = broken.copy(pm_run, "run")
    weights = _damage(run / "checkpoint" / "weights.safetensors", "truncated")
    assert_refused(["pumamednet", "train", "--data", str(cxr), "--out", str(run), "--resume", "--preset", "tiny",
                    "--epochs", "2", "--clf-epochs", "3", "--no-attention", "--val-fraction", "0"], weights, capsys,
                   protected=[run])


# ------------------------------------------------------------------------------------- rnacdm


@pytest.mark.parametrize("case", ["missing", "zero-byte", "wrong format", "truncated"])
def test_rnacdm_train_vae_broken_rna(case, rna, broken, capsys, tmp_path):
    h5ad = _h5ad_case(case, rna[0], broken)
    assert_refused(["rnacdm", "train-vae", "--rna", str(h5ad), "--out", str(tmp_path / "o"), "--hidden", "8",
                    "--latent", "2", "--epochs", "1"], h5ad, capsys)


def test_rnacdm_train_vae_broken_resume(rna_runs, rna, broken, capsys):
    run = broken.copy(rna_runs[0], "vae")
    state = _damage(run / "checkpoint" / "trainer_state.json", "bad JSON")
    assert_refused(["rnacdm", "train-vae", "--rna", str(rna[0]), "--out", str(run), "--resume", "--hidden", "16",
                    "--latent", "4", "--epochs", "3", "--batch-size", "8", "--plot", "none"], state, capsys,
                   protected=[run])


@pytest.mark.parametrize("how", ["truncated", "zero-byte", "bit flip", "wrong model type"])
@pytest.mark.parametrize("which", ["model", "vae"])
@pytest.mark.parametrize("sub", ["sample", "evaluate", "train"])
def test_rnacdm_broken_checkpoints(sub, which, how, rna_runs, rna, broken, capsys, tmp_path):
    if sub == "train" and which == "model":
        which = "init"
    vae = broken.copy(rna_runs[0] / "vae.safetensors", "vae.safetensors")
    cdm = broken.copy(rna_runs[1] / "cascade.safetensors", "cascade.safetensors")
    files = {"model": cdm, "init": cdm, "vae": vae}
    named = files[which]
    if how == "wrong model type":  # the other kind of file where this one is expected
        files[which] = named = vae if which != "vae" else cdm
    else:
        _damage(named, how)
    h5ad, tiles = rna
    argv = ["rnacdm", sub, "--rna", str(h5ad), "--vae", str(files["vae"]), "--out", str(tmp_path / "o")]
    if sub != "train":
        argv += ["--model", str(files["model"]), "--steps", "1", "--per-sample", "1"]
    else:
        argv += ["--tiles", str(tiles), "--preset", "tiny", "--steps", "1"]
        if which == "init":
            argv += ["--init", str(files["init"])]
    if sub == "evaluate":
        argv += ["--tiles", str(tiles)]
    line = assert_refused(argv, named, capsys, protected=[vae, cdm])
    if how == "wrong model type":
        assert "is not a" in line


# ------------------------------------------------------------------------------------- demos


@pytest.mark.parametrize("argv", [["tumorsynth", "demo"], ["pumamednet", "demo"], ["rnacdm", "demo"]])
def test_model_demos_keep_an_existing_output(argv, capsys, tmp_path):
    folder = tmp_path / "demo_out"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    assert_refused(argv + ["--out", str(folder)], folder, capsys, protected=[folder])


# --------------------------------------------------------------------------- Ctrl-C, checkpoints


def test_ctrl_c_during_tumorsynth_train_names_the_intact_checkpoint(tmp_path):
    from biogen.models.tumorsynth.training import verify_checkpoint

    out = tmp_path / "run"
    last = out / "checkpoints" / "last"
    argv = ["tumorsynth", "train", "--out", str(out), "--image-size", "32", "--phantoms", "24", "--epochs", "500",
            "--no-progress"]
    rc, err = _run_until(argv, ready=lambda err: (last / "manifest.json").exists())
    line = err.strip().splitlines()[-1]
    assert rc == 130, err
    assert "Traceback" not in err and line.startswith("biogen tumorsynth train: interrupted: ")
    assert str(last) in line and "is intact" in line and "--resume" in line
    state = verify_checkpoint(last)  # what the message promised
    assert f"after epoch {state['epoch'] + 1}" in line
    assert main(["tumorsynth", "sample", "--run", str(out), "--last", "--n", "2", "--out", str(tmp_path / "s.png")]) == 0


def test_ctrl_c_during_rnacdm_train_vae_names_the_intact_checkpoint(rna, tmp_path):
    from biogen.checkpoint import verify_checkpoint

    out = tmp_path / "vae"
    ck = out / "checkpoint"
    argv = ["rnacdm", "train-vae", "--rna", str(rna[0]), "--out", str(out), "--hidden", "16", "--latent", "4",
            "--epochs", "100000", "--patience", "100000", "--batch-size", "8", "--plot", "none"]
    rc, err = _run_until(argv, ready=lambda err: (ck / "manifest.json").exists())
    line = err.strip().splitlines()[-1]
    assert rc == 130, err
    assert "Traceback" not in err and line.startswith("biogen rnacdm train-vae: interrupted: ")
    assert str(ck) in line and "is intact" in line and line.endswith(" --resume")
    state = verify_checkpoint(ck)
    assert f"after epoch {state['epoch']}" in line


# ------------------------------------------------------------------------------- --device


@pytest.mark.parametrize("device", ["cuda:99", "tpu-please"])
@pytest.mark.parametrize("argv", [
    ["annotate", "benchmark", "--h5ad", "absent.h5ad", "--label-key", "x", "--out", "o"],
    ["annotate", "train", "--h5ad", "absent.h5ad", "--label-key", "x", "--model", "scgpt", "--out", "o"],
    ["annotate", "predict", "--model", "absent_model", "--h5ad", "absent.h5ad", "--out", "o.h5ad"],
    ["demo", "--out", "o"],
    ["tumorsynth", "train", "--out", "o"],
    ["tumorsynth", "demo", "--out", "o"],
    ["pumamednet", "train", "--data", "absent", "--out", "o"],
    ["rnacdm", "train-vae", "--rna", "absent.h5ad", "--out", "o"],
    ["rnacdm", "train", "--rna", "absent.h5ad", "--tiles", "t", "--vae", "v", "--out", "o"],
    ["rnacdm", "sample", "--rna", "absent.h5ad", "--model", "m", "--vae", "v", "--out", "o"],
    ["rnacdm", "demo", "--out", "o"],
], ids=lambda a: " ".join(a[:2]) if isinstance(a, list) else a)
def test_an_unusable_device_is_refused_before_any_work(argv, device, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the inputs above are absent: the device must be what is named
    line = assert_refused(argv + ["--device", device], "--device", capsys)
    assert device in line
    assert list(tmp_path.iterdir()) == []  # nothing written
