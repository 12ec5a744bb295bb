import pytest

from configurator import UserError, configure, run
from conftest import run_script


def defaults():
    return {"batch_size": 32, "learning_rate": 6e-4, "compile": False, "device": "auto", "_private": 1,
            "np": __import__("math")}


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
