"""The GPU acceptance run, exercised on the CPU: ``--device cpu --smoke`` runs the same machinery
(pytest stage, correctness checks against float64, interleaved timing, both reports) at tiny shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from biogen import cli, gpucheck
from biogen.ops import group_norm, masked_attention

SMOKE = ["--device", "cpu", "--smoke", "--rounds", "1"]
REPO = str(Path(__file__).resolve().parents[1])  # CI installs biogen as a wheel: name the checkout


def _load(out):
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_smoke_run_writes_both_reports(tmp_path, capsys):
    out = tmp_path / "run"
    assert gpucheck.main(SMOKE + ["--out", str(out), "--repo", REPO]) == 0
    data, md = _load(out)
    assert data["ok"] is True and data["failures"] == [] and data["smoke"] is True
    for key in ("schema", "device", "env", "tests", "benchmarks", "correctness", "elapsed_s"):
        assert key in data
    tests = data["tests"]
    assert tests["passed"] >= 4 and tests["failed"] == 0 and tests["error"] is None
    assert all(c["outcome"] == "passed" and "::" in c["id"] for c in tests["cases"])
    assert "cpu" in data["env"]["backends"] and "cuda" in data["env"]["backends"]
    names = {c["name"] for c in data["correctness"]}
    assert {"masked_gene_attention fwd", "masked_gene_attention fwd+bwd", "performer_attention fwd+bwd",
            "group_norm_silu fwd+bwd", "scgpt train step (generative)", "scbert train step (MLM logits)"} <= names
    for c in data["correctness"]:
        assert c["ok"] and c["max_rel_err"] <= c["tol"]
    impls = {(b["name"], b["impl"]) for b in data["benchmarks"]}
    for case, baseline in [("masked_gene_attention fwd", "sdpa_dense_mask"),
                           ("masked_gene_attention fwd", "flex_attention"),
                           ("performer_attention fwd", "performer_pytorch"),
                           ("group_norm_silu fwd+bwd", "torch_group_norm_silu"),
                           ("scgpt train step (generative)", "biogen_torch_reference")]:
        assert (case, "biogen") in impls and (case, baseline) in impls
    for b in data["benchmarks"]:
        assert b["median_ms"] > 0
        if b["impl"] == "biogen":
            assert all(r > 0 for r in b["speedup_vs"].values()) and b["speedup_vs"]
    rate = next(b for b in data["benchmarks"] if b["name"] == "masked_gene_attention fwd" and b["impl"] == "biogen")
    assert rate["TFLOP/s"] > 0
    assert md.startswith("# biogen GPU acceptance run: PASS") and "| masked_gene_attention fwd |" in md
    assert "PASS" in capsys.readouterr().out


def _bad_forward(module, monkeypatch):
    real = module._run_fwd

    def wrong(backend, *args):
        out = real(backend, *args)
        if backend == "torch":  # only biogen's own path, never the float64 truth
            return out
        return (out[0] * 1.01, *out[1:])

    monkeypatch.setattr(module, "_run_fwd", wrong)


def test_wrong_forward_gives_a_failing_report_and_nonzero_exit(tmp_path, monkeypatch):
    _bad_forward(masked_attention, monkeypatch)
    out = tmp_path / "bad"
    assert gpucheck.main(SMOKE + ["--out", str(out), "--no-tests", "--cases", "masked"]) == 1
    data, md = _load(out)
    assert data["ok"] is False and md.startswith("# biogen GPU acceptance run: FAIL")
    bad = [c for c in data["correctness"] if not c["ok"]]
    assert {c["name"] for c in bad} == {"masked_gene_attention fwd", "masked_gene_attention fwd+bwd"}
    assert any("masked_gene_attention" in f for f in data["failures"])


def test_wrong_gradient_only_is_caught(tmp_path, monkeypatch):
    real = group_norm._run_bwd

    def wrong(backend, *args):
        dx, *rest = real(backend, *args)
        return (dx if backend == "torch" else dx * 0.98, *rest)

    monkeypatch.setattr(group_norm, "_run_bwd", wrong)
    out = tmp_path / "bad"
    assert gpucheck.main(SMOKE + ["--out", str(out), "--no-tests", "--cases", "group_norm"]) == 1
    data, _ = _load(out)
    assert {c["name"]: c["ok"] for c in data["correctness"]} == {"group_norm_silu fwd": True,
                                                                "group_norm_silu fwd+bwd": False}


def test_a_failing_kernel_test_fails_the_run(tmp_path):
    repo = tmp_path / "repo"
    (repo / "tests" / "ops").mkdir(parents=True)
    (repo / "tests" / "ops" / "test_k.py").write_text(
        "def test_cuda_ok():\n    assert True\n\ndef test_cuda_wrong():\n    assert 1 + 1 == 3\n")
    out = tmp_path / "run"
    rc = gpucheck.main(SMOKE + ["--out", str(out), "--repo", str(repo), "--tests-k", "cuda", "--cases", "group_norm"])
    assert rc == 1
    data, md = _load(out)
    outcomes = {c["id"].split("::")[-1]: c["outcome"] for c in data["tests"]["cases"]}
    assert outcomes == {"test_cuda_ok": "passed", "test_cuda_wrong": "failed"}
    assert "FAILED" in md and "test_cuda_wrong" in md


def test_usage_errors_are_one_line(tmp_path, capsys):
    assert gpucheck.main(["--device", "cpu", "--out", str(tmp_path / "a")]) == 2
    assert "--smoke" in capsys.readouterr().err
    assert gpucheck.main(SMOKE + ["--out", str(tmp_path / "b"), "--repo", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "repository checkout" in err and len(err.strip().splitlines()) == 1
    assert gpucheck.main(SMOKE + ["--out", str(tmp_path / "c"), "--no-tests", "--cases", "attention"]) == 2
    assert "unknown --cases entry 'attention'" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "report.md").write_text("an earlier run")
    assert gpucheck.main(SMOKE + ["--out", str(tmp_path / "d"), "--no-tests", "--cases", "group_norm"]) == 2
    assert "already holds report.md" in capsys.readouterr().err
    assert (tmp_path / "d" / "report.md").read_text() == "an earlier run"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_device_without_a_gpu_is_a_usage_error(tmp_path, capsys):
    assert cli.main(["gpucheck", "--out", str(tmp_path / "x")]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_subcommand_help_says_it_runs_from_a_checkout(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["gpucheck", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "repository checkout" in text and "--smoke" in text and "report.json" in text


def test_a_test_stage_past_its_timeout_is_interrupted_and_keeps_the_cases_that_ran(tmp_path):
    repo = tmp_path / "repo"
    (repo / "tests" / "ops").mkdir(parents=True)
    (repo / "tests" / "ops" / "test_k.py").write_text(
        "import time\n\ndef test_cuda_a_fast():\n    assert True\n\n"
        "def test_cuda_b_hangs():\n    time.sleep(120)\n")
    out = tmp_path / "run"
    rc = gpucheck.main(SMOKE + ["--out", str(out), "--repo", str(repo), "--tests-k", "cuda", "--test-timeout", "8",
                                "--cases", "group_norm"])
    assert rc == 1
    data, _ = _load(out)
    t = data["tests"]
    assert "did not finish within 8 s" in t["error"] and t["duration_s"] < 60
    assert {"id": "tests.ops.test_k::test_cuda_a_fast", "outcome": "passed"}.items() <= t["cases"][0].items()


def test_time_interleaved_warms_up_then_rotates_the_order():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    med = gpucheck.time_interleaved(fns, 3, torch.device("cpu"))
    assert set(med) == set("abc") and all(v >= 0 for v in med.values())
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
