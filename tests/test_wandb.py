"""The wandb logger writes an offline run (no network) whose records hold the metrics and weight histograms."""

import json
import struct
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from metareweight import MetaTrainer, MetaWeightNet, TensorIndexedDataset, read_jsonl

wandb_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")


def read_wandb_records(path):
    """The protobuf records of a ``.wandb`` file (LevelDB log format: 7-byte file header ':W&B' + magic +
    version, then 32 KiB blocks of chunks with a crc32/length/type header)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if length == 0 and kind == 0:
            break
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST chunk
            record = wandb_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _history_rows(records):
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def test_offline_run_holds_metrics_and_weight_histograms(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.manual_seed(0)
    x = torch.randn(48, 4)
    ds = TensorIndexedDataset(x, (x[:, 0] > 0).long(), noisy=torch.arange(48) % 3 == 0)
    model = nn.Linear(4, 2)
    trainer = MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds, batch_size=16),
                          MetaWeightNet(hidden=4), meta_loader=DataLoader(ds, batch_size=16), log_dir=tmp_path,
                          logger="wandb", progress=False)
    trainer.fit(epochs=2)

    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, "expected exactly one offline run"
    deadline = time.time() + 30
    while True:  # the wandb service process may still be flushing the file when finish() returns
        records = read_wandb_records(files[0])
        kinds = [r.WhichOneof("record_type") for r in records]
        if "exit" in kinds or time.time() > deadline:
            break
        time.sleep(0.2)
    assert "run" in kinds and "exit" in kinds, kinds
    run = records[kinds.index("run")].run
    logger = trainer.callbacks[-1]
    assert run.run_id == logger.state_dict()["run_id"] and logger.run is None  # finished
    rows = _history_rows(records)
    steps = [row for row in rows if "train/train_loss" in row]
    jsonl = [row for row in read_jsonl(tmp_path / "metrics.jsonl") if row["event"] == "step"]
    assert [row["_step"] for row in steps] == [row["step"] for row in jsonl] == list(range(1, 7))
    assert [row["train/train_loss"] for row in steps] == pytest.approx([row["train_loss"] for row in jsonl])
    assert [row["train/meta_loss"] for row in steps] == pytest.approx([row["meta_loss"] for row in jsonl])
    hist = [row for row in rows if "weights/histogram/_type" in row]
    assert len(hist) == 2 and all(row["weights/histogram/_type"] == "histogram" for row in hist)
    assert all(sum(row["weights/histogram/values"]) == 48 for row in hist)  # one weight per sample and epoch
    epochs = [row for row in rows if "epoch/weight_auroc" in row]
    assert [row["epoch/epoch"] for row in epochs] == [0, 1]


def test_bad_logger_and_mode_are_named():
    from metareweight.wandb_logger import WandbLogger

    with pytest.raises(ValueError, match="mode must be 'offline', 'online', 'disabled'"):
        WandbLogger(mode="cloud")
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="logger must be 'wandb' or a Callback"):
        MetaTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), [], MetaWeightNet(), meta_loader=[],
                    logger="mlflow")  # a logger this library does not have
