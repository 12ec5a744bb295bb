"""The shipped configs: each run keeps its own folder, and the machine chooses the device."""
import ast

import pytest

from configurator import settings_block
from conftest import ROOT

CONFIGS = sorted((ROOT / "config").glob("*.py"))


def assignments(path):
    """The names a config file assigns, with their values (configs are plain `name = literal` lines)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)}


TRAIN_SETTINGS, RL_SETTINGS = (set(settings_block(ROOT / script)) for script in ("train.py", "rl.py"))
TRAIN_CONFIGS = [path for path in CONFIGS if set(assignments(path)) <= TRAIN_SETTINGS]  # the rest are rl.py's


def test_every_config_is_for_train_or_rl():
    for path in CONFIGS:
        names = set(assignments(path))
        assert names <= TRAIN_SETTINGS or names <= RL_SETTINGS, f"{path.name}: {names - TRAIN_SETTINGS}"
    assert [p.name for p in CONFIGS if p not in TRAIN_CONFIGS] == ["tinystories_1m_rl.py"]


def test_every_config_has_its_own_out_dir():
    out_dirs = [assignments(path).get("out_dir") for path in CONFIGS]
    assert len(CONFIGS) >= 7 and all(out_dirs) and len(set(out_dirs)) == len(CONFIGS), out_dirs
    for path, out_dir in zip(CONFIGS, out_dirs):
        assert out_dir.startswith("out"), f"{path.name}: {out_dir} is not covered by .gitignore's out*/"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_no_config_pins_a_device(path):
    assert "device" not in assignments(path)  # train.py's device=auto picks CUDA, else mps, else the CPU


@pytest.mark.parametrize("name, low, high", [("tinystories_70m", 60e6, 80e6), ("tinystories_110m", 100e6, 120e6)])
def test_the_large_configs_build_models_of_their_stated_sizes(name, low, high):
    from dataclasses import fields

    from checkpoint import count_params
    from model import GPTConfig, padded_vocab_size
    settings = assignments(ROOT / "config" / f"{name}.py")
    shape = {f.name: settings[f.name] for f in fields(GPTConfig) if f.name in settings}
    config = GPTConfig(**{**shape, "vocab_size": padded_vocab_size(settings["vocab_size"])})  # as train.py pads it
    assert low <= count_params(config) <= high
    assert settings["optimizer"] == "muon" and config.qk_norm and config.pos_embedding == "rope"  # the modern recipe
