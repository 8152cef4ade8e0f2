import os

import pytest
import torch

# Triton kernels run on the CPU only under its interpreter; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.pop("BIOGEN_BACKEND", None)  # tests choose backends explicitly


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ------------------------------------------------------------------ no silent skips in CI
# With BIOGEN_STRICT_SKIPS=1 (set by .ci/run) a skip fails the run unless its reason is one that only
# the machine explains: no GPU, no CUDA compiler, a CPU without an instruction set, or a backend's
# documented input limits. A missing package or an unbuilt C++ kernel is not such a reason: a test that
# backs a README sentence must run in CI, not pass by skipping.
import re  # noqa: E402

_MACHINE_ONLY = [re.compile(p) for p in (
    r"tensors are on cpu",  # a cuda/triton backend on a machine without a GPU
    r"tensors are on cpu, the cuda backend needs cuda tensors",
    r"Triton runs on the CPU only with TRITON_INTERPRET=1",
    r"triton does not support device \w+",
    r"biogen\._C was built without a CUDA compiler",
    r"CUDA extension not built",
    r"\w+ has no cuda implementation",
    r"(needs|requires) (a GPU|CUDA|a CUDA device)",
    r"no CUDA device",
    r"this CPU lacks \w+",
    r"\w+ not compiled on this platform",
    r"supports .+",  # a backend's documented limits (dtype, head_dim, ...) for a parametrised input
)]
_SKIPS: list[tuple[str, str]] = []


def _skip_reason(report) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


def machine_only(reason: str) -> bool:
    """Whether every clause of a skip reason ("<backend> unavailable: a; b") is one the machine explains."""
    reason = re.sub(r"^\w+ unavailable: ", "", reason.strip())
    return all(any(p.fullmatch(c.strip()) for p in _MACHINE_ONLY) for c in reason.split("; "))


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPS.append((report.nodeid, _skip_reason(report)))


def _bad_skips() -> list[tuple[str, str]]:
    if os.environ.get("BIOGEN_STRICT_SKIPS") != "1":
        return []
    return [(n, r) for n, r in _SKIPS if not machine_only(r)]


def pytest_sessionfinish(session, exitstatus):
    if _bad_skips() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bad = _bad_skips()
    if bad:
        terminalreporter.section("skips not explained by the machine (BIOGEN_STRICT_SKIPS=1)", red=True)
        for nodeid, reason in bad:
            terminalreporter.write_line(f"{nodeid}: {reason}")
        terminalreporter.write_line(f"{len(bad)} test(s) skipped for a reason CI must not accept: install "
                                    "what they need in .ci/run / the test extra, or build the kernel")
