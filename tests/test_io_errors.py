"""biogen._io (readers naming the file, verified folders, whole-folder replacement), biogen.errors and
the error path of ``biogen.cli.main``."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from biogen import _io, cli
from biogen.checkpoint import checkpoint_note, load_training_state, save_training_state
from biogen.errors import BiogenError, CorruptFileError, IncompatibleError, MissingFileError, is_user_error


@pytest.fixture
def st_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(12, dtype=torch.float32), "b": torch.ones(3, 4)}, str(path), metadata={"k": "v"})
    return path


def test_safetensors_checks_name_the_file_and_the_problem(st_file, tmp_path):
    data = st_file.read_bytes()
    assert _io.safetensors_metadata(st_file) == {"k": "v"}
    assert torch.equal(_io.load_safetensors(st_file)["a"], torch.arange(12, dtype=torch.float32))
    bad = tmp_path / "bad.safetensors"
    # every cut point: inside the length prefix, the header, and the tensor data
    for cut in (0, 5, 12, len(data) - 60, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(CorruptFileError, match="empty" if cut == 0 else "truncated") as e:
            _io.load_safetensors(bad)
        assert str(bad) in str(e.value)
    bad.write_bytes(data + b"\0" * 7)
    with pytest.raises(CorruptFileError, match="7 bytes more"):
        _io.load_safetensors(bad)
    torch.save({"a": torch.ones(2)}, bad)  # a torch pickle zip renamed
    with pytest.raises(CorruptFileError, match="not a safetensors file"):
        _io.load_safetensors(bad)
    with pytest.raises(MissingFileError, match="does not exist"):
        _io.load_safetensors(tmp_path / "nope.safetensors")


def test_single_file_models_carry_format_version_and_checksum(tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = {"w": torch.randn(4, 3), "b": torch.zeros(3, dtype=torch.bfloat16), "n": torch.tensor(5)}
    _io.save_safetensors(tensors, path, fmt="biogen.test", version=1, metadata={"config": "{}"})
    got, meta = _io.load_safetensors_verified(path, fmt="biogen.test", version=1, what="test model")
    assert all(torch.equal(got[k], tensors[k]) for k in tensors) and meta["config"] == "{}"
    with pytest.raises(IncompatibleError, match="is not a other model"):
        _io.load_safetensors_verified(path, fmt="biogen.other", version=1, what="other model")
    with pytest.raises(IncompatibleError, match="format version 1; this biogen reads up to 0"):
        _io.load_safetensors_verified(path, fmt="biogen.test", version=0, what="test model")
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01  # one bit of tensor data: the size is right, the checksum is not
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="m.safetensors: is corrupt"):
        _io.load_safetensors_verified(path, fmt="biogen.test", version=1, what="test model")


def test_json_and_torch_readers_name_the_file(tmp_path):
    p = tmp_path / "state.json"
    p.write_text('{"epoch": 3,\n}')
    with pytest.raises(CorruptFileError, match=r"state\.json: is not valid JSON: .* line 2 column 1"):
        _io.read_json(p)
    p.write_text("")
    with pytest.raises(CorruptFileError, match="empty"):
        _io.read_json(p)
    t = tmp_path / "optim.pt"
    torch.save({"x": torch.ones(100)}, t)
    t.write_bytes(t.read_bytes()[:-40])
    with pytest.raises(CorruptFileError, match="optim.pt: could not be read"):
        _io.torch_load(t)


def test_manifest_detects_truncation_corruption_and_foreign_folders(st_file, tmp_path):
    folder = st_file.parent
    (folder / "config.json").write_text('{"x": 1}')
    m = _io.write_manifest(folder, "biogen.test", 2, extra="yes")
    assert m["files"]["w.safetensors"]["bytes"] == st_file.stat().st_size and m["extra"] == "yes"
    assert _io.verify_folder(folder, "biogen.test", version=2, what="test folder")["format"] == "biogen.test"
    with pytest.raises(IncompatibleError, match="not a test folder"):
        _io.verify_folder(folder, "biogen.other", version=2, what="test folder")
    with pytest.raises(IncompatibleError, match="format version 2; this biogen reads up to 1"):
        _io.verify_folder(folder, "biogen.test", version=1, what="test folder")
    good = st_file.read_bytes()
    st_file.write_bytes(good[:-3])
    with pytest.raises(CorruptFileError, match=r"w\.safetensors: is truncated \(\d+ of \d+ bytes\)"):
        _io.verify_folder(folder, "biogen.test", version=2, what="test folder")
    st_file.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same size, one bit flipped
    with pytest.raises(CorruptFileError, match="SHA-256"):
        _io.verify_folder(folder, "biogen.test", version=2, what="test folder")
    st_file.unlink()
    with pytest.raises(MissingFileError, match="missing"):
        _io.verify_folder(folder, "biogen.test", version=2, what="test folder")
    (folder / "manifest.json").unlink()
    with pytest.raises(CorruptFileError, match="no manifest.json"):
        _io.verify_folder(folder, "biogen.test", version=2, what="test folder")


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_dir_replaces_all_or_nothing(tmp_path, monkeypatch, exchange):
    if not exchange:  # the two-rename fallback of systems without renameat2
        monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(BiogenError, match="not empty"):
        with _io.replacing_dir(target):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with _io.replacing_dir(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with _io.replacing_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary folder left behind"


def _train_state(folder, epoch, w):
    lin = torch.nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.fill_(w)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    save_training_state(folder, modules={"m": lin}, optimizers={"o": opt}, generators={"g": torch.Generator()},
                        state={"epoch": epoch, "config": {"a": 1}})
    return lin, opt


def test_checkpoint_is_verified_on_resume_and_refuses_foreign_folders(tmp_path):
    ck = tmp_path / "ck"
    _train_state(ck, 1, 1.0)
    _train_state(ck, 2, 2.0)
    lin, opt = torch.nn.Linear(2, 2), None
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    state = load_training_state(ck, modules={"m": lin}, optimizers={"o": opt}, generators={"g": torch.Generator()},
                                config={"a": 1})
    assert state["epoch"] == 2 and torch.all(lin.weight == 2.0)
    assert "after epoch 2" in checkpoint_note(ck, "biogen x --resume") and "biogen x --resume" in checkpoint_note(ck, "biogen x --resume")
    with pytest.raises(IncompatibleError, match="another configuration"):
        load_training_state(ck, modules={"m": lin}, optimizers={}, generators={}, config={"a": 2})
    w = ck / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-8])
    with pytest.raises(CorruptFileError, match="weights.safetensors: is truncated"):
        load_training_state(ck, modules={"m": lin}, optimizers={}, generators={})
    assert "no complete checkpoint" in checkpoint_note(ck, "x")
    (ck / "trainer_state.json").write_text("{\n")  # what issue 20 saw: a JSON error without the name
    with pytest.raises(CorruptFileError, match="trainer_state.json: is"):
        load_training_state(ck, modules={}, optimizers={}, generators={})
    with pytest.raises(MissingFileError, match="holds no checkpoint"):
        load_training_state(tmp_path / "none", modules={}, optimizers={}, generators={})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(BiogenError, match="holds other files"):
        _train_state(mine, 1, 1.0)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def _raise_from_biogen():
    from biogen.sc.benchmark import BenchmarkConfig

    BenchmarkConfig(label_key="x", test_size=2.0)  # biogen's own worded check


def test_user_errors_are_told_apart_from_bugs():
    with pytest.raises(ValueError) as ours:
        _raise_from_biogen()
    assert is_user_error(ours.value)
    with pytest.raises(ValueError) as lib:  # raised inside a library: a biogen bug if it reaches the user
        json.loads("{")
    assert not is_user_error(lib.value)
    assert is_user_error(FileNotFoundError(2, "No such file", "x.h5ad"))
    assert not is_user_error(AttributeError("x"))


def test_main_one_line_or_traceback_with_debug(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "nope")
    argv = ["annotate", "predict", "--model-dir", missing, "--h5ad", "q.h5ad", "--out", str(tmp_path / "o.h5ad")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and missing in err and "Traceback" not in err
    assert err.startswith("biogen annotate predict: error: ")
    for args, env in ((argv + ["--debug"], None), (["--debug"] + argv, None), (argv, "1")):
        if env:
            monkeypatch.setenv("BIOGEN_DEBUG", env)
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("biogen annotate predict: error:")
    monkeypatch.delenv("BIOGEN_DEBUG")

    def bug(args):
        return {}["not a user error"]

    def interrupted(args):
        raise KeyboardInterrupt

    parser = cli.build_parser
    for func, code in ((bug, None), (interrupted, 130)):
        monkeypatch.setattr(cli, "build_parser", lambda f=func: _with_func(parser(), f))
        if code is None:
            with pytest.raises(KeyError):
                cli.main(["info"])
        else:
            assert cli.main(["info"]) == code
            err = capsys.readouterr().err
            assert err.startswith("\nbiogen info: interrupted: ") and err.count("\n") == 2


def _with_func(parser, func):
    parser._subparsers._group_actions[0].choices["info"].set_defaults(func=func)
    return parser
