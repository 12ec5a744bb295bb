import runpy

import pytest

from configurator import UserError, configure, run, settings_block
from conftest import ROOT, run_script

SCRIPTS = ["train.py", "sample.py", "eval.py", "prepare.py", "serve.py", "export.py", "bench.py", "rl.py"]


def defaults():
    return {"batch_size": 32, "learning_rate": 6e-4, "compile": False, "device": "auto"}


SCRIPT = """import math
from math import pi
EPS = 1e-5  # a constant, above the block
# ------------------------------------------------------------------
batch_size = 32  # sequences per step
device = "auto"  # where to run
# ------------------------------------------------------------------
MARKER = ".export"  # a constant, below the block
_private = 1
"""


def test_a_scripts_settings_are_exactly_its_settings_block(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    scope = runpy.run_path(str(script))
    assert configure(scope, ["--batch_size=8"]) == {"batch_size": 8, "device": "auto"}
    for constant in ("--EPS=0.5", "--MARKER=log.csv", "--pi=3", "--math=1", "--_private=2"):
        with pytest.raises(UserError, match="unknown key"):
            configure(runpy.run_path(str(script)), [constant])
    config_file = tmp_path / "c.py"
    config_file.write_text("MARKER = 'log.csv'\n")  # a config file cannot set a constant either
    with pytest.raises(UserError, match="unknown key 'MARKER'"):
        configure(runpy.run_path(str(script)), [str(config_file)])


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_script_has_a_constant_or_an_import_among_its_settings(script):
    names = settings_block(ROOT / script)
    assert names and all(name.islower() and not name.startswith("_") for name in names)
    scope = runpy.run_path(str(ROOT / script))  # not run as __main__: defines the settings, runs nothing
    assert all(isinstance(scope[name], (int, float, bool, str)) for name in names)


def test_flags_parse_as_python_literals_else_strings():
    d = defaults()
    config = configure(d, ["--batch_size=8", "--learning_rate=1e-3", "--compile=True", "--device=cpu"])
    assert config == {"batch_size": 8, "learning_rate": 1e-3, "compile": True, "device": "cpu"}
    assert d["batch_size"] == 8 and d["device"] == "cpu"  # the script's globals are updated in place


def test_int_is_accepted_for_float_and_string_settings_keep_text():
    d = {"learning_rate": 6e-4, "start": "Once"}
    config = configure(d, ["--learning_rate=1", "--start=123"])
    assert config["learning_rate"] == 1.0 and isinstance(config["learning_rate"], float)
    assert config["start"] == "123"


def test_config_file_then_flags_in_order(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\nfrom math import sqrt\nbatch_size = 4\nlearning_rate = 1e-2 * sqrt(1)\n")
    config = configure(defaults(), [str(cfg), "--batch_size=16"])
    assert config["batch_size"] == 16 and config["learning_rate"] == pytest.approx(1e-2)


def test_odd_literals_are_strings_or_type_errors_never_crashes():
    assert configure({"device": "auto"}, ["--device={[]: 1}"])["device"] == "{[]: 1}"
    with pytest.raises(UserError, match="batch_size must be int"):
        configure(defaults(), ["--batch_size={[]: 1}"])


def test_wrong_type_is_rejected():
    with pytest.raises(UserError, match="batch_size must be int"):
        configure(defaults(), ["--batch_size=0.5"])
    with pytest.raises(UserError, match="compile must be bool"):
        configure(defaults(), ["--compile=yes"])


def test_unknown_key_suggests_the_closest():
    with pytest.raises(UserError, match="unknown key 'batch_sise'; did you mean batch_size"):
        configure(defaults(), ["--batch_sise=3"])


def test_unknown_key_in_config_file(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("learnig_rate = 1e-3\n")
    with pytest.raises(UserError, match="did you mean learning_rate"):
        configure(defaults(), [str(cfg)])


def test_missing_and_failing_config_files(tmp_path):
    with pytest.raises(UserError, match="config file 'nope.py' not found"):
        configure(defaults(), ["nope.py"])
    bad = tmp_path / "bad.py"
    bad.write_text("batch_size = 4\nlearning_rate = 1 / 0\n")
    with pytest.raises(UserError, match="failed at line 2: ZeroDivisionError"):
        configure(defaults(), [str(bad)])
    with pytest.raises(UserError, match="form --key=value"):
        configure(defaults(), ["--batch_size"])
    assert configure(defaults(), ["--compile"])["compile"] is True  # a bare flag turns a bool on


@pytest.mark.slow
def test_help_lists_keys_with_defaults():
    proc = run_script("train.py", "--help")
    assert "--batch_size=32" in proc.stdout and "--learning_rate=0.0006" in proc.stdout


@pytest.mark.slow
def test_help_lists_exactly_the_settings():
    proc = run_script("export.py", "--help")
    listed = [line.split()[0].split("=")[0][2:] for line in proc.stdout.splitlines() if line.startswith("  --")]
    assert listed == settings_block(ROOT / "export.py") and "NORM_EPS" not in proc.stdout


def test_missing_mps_operation_gets_the_fallback_advice(capsys):
    def main():
        raise NotImplementedError("The operator 'aten::_foo' is not currently implemented for the MPS device.")
    with pytest.raises(SystemExit) as stop:
        run(main)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "aten::_foo" in err and "PYTORCH_ENABLE_MPS_FALLBACK=1" in err
    assert len(err.splitlines()) == 1

    def bug():
        raise NotImplementedError("a method nobody wrote")
    with pytest.raises(NotImplementedError):  # other NotImplementedErrors are bugs: traceback as usual
        run(bug)


def test_a_torchrun_peer_that_died_is_one_line_naming_the_resume(monkeypatch, capsys):
    import torch.distributed as dist

    def main():  # what gloo raises in rank 0 when another process of the group has gone
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:4242: "
                           "Connection reset by peer")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    with pytest.raises(SystemExit) as stop:
        run(main)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: another process of this torchrun run stopped")
    assert "Connection reset by peer" in err and "--init_from=resume" in err

    def bug():
        raise RuntimeError("shape mismatch")  # any other error in a process group is a bug: traceback as usual
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run(bug)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="Connection reset"):  # outside torchrun it is not ours to explain
        run(main)


def test_a_settings_block_holds_only_plain_assignments(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.replace("device = \"auto\"  # where to run", "device: str = \"auto\""))
    with pytest.raises(RuntimeError, match="line 6: a settings block holds only `name = value` lines"):
        settings_block(script)
    script.write_text("def main():\n    pass\n" + SCRIPT)  # rules after the first function are not a block
    with pytest.raises(RuntimeError, match="has no settings block"):
        settings_block(script)
