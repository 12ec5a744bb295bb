"""The shipped configs: each run keeps its own folder, and the machine chooses the device."""
import ast

import pytest

from conftest import ROOT

CONFIGS = sorted((ROOT / "config").glob("*.py"))


def assignments(path):
    """The names a config file assigns, with their values (configs are plain `name = literal` lines)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)}


def test_every_config_has_its_own_out_dir():
    out_dirs = [assignments(path).get("out_dir") for path in CONFIGS]
    assert len(CONFIGS) >= 7 and all(out_dirs) and len(set(out_dirs)) == len(CONFIGS), out_dirs
    for path, out_dir in zip(CONFIGS, out_dirs):
        assert out_dir.startswith("out"), f"{path.name}: {out_dir} is not covered by .gitignore's out*/"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_no_config_pins_a_device(path):
    assert "device" not in assignments(path)  # train.py's device=auto picks CUDA, else mps, else the CPU
