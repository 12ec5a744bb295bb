"""Optional experiment tracking: wandb_log and tensorboard_log get log.csv's numbers; a missing package is one line."""
import csv
import json
import struct

import pytest

from conftest import TINY, assert_user_error, run_script

pytestmark = pytest.mark.slow  # every test here starts train.py as a subprocess


def offline_env(tmp_path):
    """wandb without the network, and with nothing written outside tmp_path."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wandb_dir"),
            "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
            "WANDB_DATA_DIR": str(tmp_path / "wandb_data")}


def wandb_history(path):
    """The rows that wandb.log wrote to an offline run's .wandb file: after a 7-byte header, records in LevelDB's
    log format (32 KiB blocks; each piece has a 7-byte header: CRC-32, length, type FULL=1/FIRST/MIDDLE/LAST=4)
    holding wandb's protobuf Record messages."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, record, rows = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        record += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            message = pb.Record()
            message.ParseFromString(record)
            record = b""
            if message.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in message.history.item})
    return rows


def test_wandb_and_tensorboard_get_the_numbers_of_log_csv(sample_data, tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "out"
    run_script("train.py", *TINY, f"--data_dir={sample_data}", f"--out_dir={out}", "--max_iters=4",
               "--eval_interval=2", "--log_interval=2", "--lr_decay_iters=10", "--wandb_log=True",
               "--tensorboard_log=True", env=offline_env(tmp_path))
    with open(out / "log.csv") as f:
        log = list(csv.DictReader(f))
    assert [int(r["iter"]) for r in log] == [0, 2, 4]
    columns = ["tokens", "train_loss", "val_loss", "train_bpb", "val_bpb", "lr"]

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert {*columns, "elapsed_s", "step_loss", "tokens_per_s"} <= set(events.Tags()["scalars"])
    for name in columns:
        assert [e.step for e in events.Scalars(name)] == [0, 2, 4]
        for event, row in zip(events.Scalars(name), log):
            assert event.value == pytest.approx(float(row[name]), rel=1e-4, abs=1e-5), name
    assert [e.step for e in events.Scalars("step_loss")] == [2, 4]

    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history = [r for r in wandb_history(runs[0]) if "val_loss" in r]
    assert [r["_step"] for r in history] == [0, 2, 4]
    for logged, row in zip(history, log):
        for name in columns:
            assert logged[name] == pytest.approx(float(row[name]), rel=1e-4, abs=1e-5), name
        assert logged["elapsed_s"] == pytest.approx(float(row["elapsed_s"]), abs=0.1)


@pytest.mark.parametrize("flag,package", [("wandb_log", "wandb"), ("tensorboard_log", "tensorboard")])
def test_a_tracker_that_is_not_installed_is_one_line(flag, package, sample_data, tmp_path):
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / f"{package}.py").write_text(f"raise ImportError('No module named {package}')\n")
    out = tmp_path / "out"
    proc = run_script("train.py", *TINY, f"--data_dir={sample_data}", f"--out_dir={out}", f"--{flag}=True",
                      check=False, env={"PYTHONPATH": str(stubs), **offline_env(tmp_path)})
    assert_user_error(proc, f"{flag}=True needs", f"pip install {package}")
    assert not out.exists()  # refused before anything was written
