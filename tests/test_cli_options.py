"""Every ``biogen`` command spells and means the shared options the same way (issue 21)."""

from __future__ import annotations

import argparse

import pytest

from biogen.cli import build_parser


def _commands(parser=None, path=()):
    """(command path, parser) of every leaf command."""
    parser = parser or build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path), parser
    for s in subs:
        for name, child in s.choices.items():
            yield from _commands(child, path + (name,))


COMMANDS = dict(_commands())
OPTIONS = {c: {o: a for a in p._actions for o in a.option_strings} for c, p in COMMANDS.items()}

# the commands that train or run a torch model: each takes --seed and --device
TRAINING = ["annotate benchmark", "annotate train", "demo", "tumorsynth train", "tumorsynth demo", "pumamednet train",
            "pumamednet demo", "rnacdm train-vae", "rnacdm train", "rnacdm demo"]
# the commands that show progress bars: each can hide them
PROGRESS = ["annotate benchmark", "annotate train", "demo", "tumorsynth train", "tumorsynth demo", "rnacdm sample"]


def test_the_tables_name_real_commands():
    assert set(TRAINING) | set(PROGRESS) <= set(COMMANDS)


@pytest.mark.parametrize("cmd", TRAINING)
def test_training_commands_take_seed_and_device(cmd):
    opts = OPTIONS[cmd]
    assert "--seed" in opts and "--device" in opts, sorted(opts)


@pytest.mark.parametrize("cmd", PROGRESS)
def test_commands_with_progress_bars_can_hide_them(cmd):
    assert "--no-progress" in OPTIONS[cmd]


def test_shared_options_mean_the_same_everywhere():
    seen = {"--resume": set(), "--no-progress": set(), "--overwrite": set(), "--device": set(), "--seed": set()}
    for cmd, opts in OPTIONS.items():
        if cmd == "gpucheck":  # its --device picks the machine under test (cuda, or cpu --smoke), not a model's
            continue
        for flag in ("--resume", "--no-progress", "--overwrite"):
            if flag in opts:  # a flag, never a value
                seen[flag].add(cmd)
                assert isinstance(opts[flag], argparse._StoreTrueAction), (cmd, flag)
        if "--device" in opts:
            seen["--device"].add(cmd)
            assert opts["--device"].default == "auto", cmd
        if "--seed" in opts:
            seen["--seed"].add(cmd)
            assert opts["--seed"].type is int, cmd
    assert {"rnacdm train", "rnacdm train-vae", "pumamednet train", "tumorsynth train"} <= seen["--resume"]


def test_every_option_is_explained():
    for cmd, parser in COMMANDS.items():
        for a in parser._actions:
            if a.option_strings and not isinstance(a, argparse._HelpAction):
                assert a.help and len(a.help) > 8, (cmd, a.option_strings)


@pytest.mark.parametrize("model", ["scgpt", "scbert"])
def test_annotate_train_forwards_seed_device_and_progress(model, tmp_path, monkeypatch):
    from biogen.cli import main
    from biogen.sc import benchmark
    from biogen.sc.datasets import synthetic

    a = synthetic(n_cells=30, n_genes=20, n_types=2, seed=1)
    a.obs["cell_type"] = a.obs["cell_type"].astype(str)
    a.write_h5ad(tmp_path / "ref.h5ad")
    got = {}

    class Stop(Exception):
        pass

    class Recorder:
        def __init__(self, **kw):
            got.update(kw)

        def fit(self, *a, **k):
            raise Stop

    monkeypatch.setitem(benchmark.ANNOTATORS, model, Recorder)
    argv = ["annotate", "train", "--h5ad", str(tmp_path / "ref.h5ad"), "--label-key", "cell_type", "--model", model,
            "--out", str(tmp_path / "m"), "--seed", "7", "--device", "cpu", "--no-progress", "--epochs", "2"]
    with pytest.raises(Stop):
        main(["--debug", *argv])
    assert got == {"seed": 7, "device": "cpu", "progress": False, "preset": "small", "epochs": 2}
