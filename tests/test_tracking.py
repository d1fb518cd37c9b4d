"""runtime.tracking: TensorBoard event files and MLflow runs for finished teachers and students."""
import pytest

from kd_ray.core.config import ConfigError
from kd_ray.core.config_files import load_config
from kd_ray.stages.tracking import mlflow_uri, save_config, track

HISTORY = [{"epoch": 1, "loss": 1.5, "val_accuracy": 0.5}, {"epoch": 2, "loss": 0.9, "val_accuracy": 0.75}]


def _runs(cfg):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri(cfg))
    exp = client.get_experiment_by_name(cfg.name)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the TensorBoard event files in ``folder`` (TFRecord framing: length, CRC,
    an Event protobuf, CRC), read with tensorboardX's own protobuf classes."""
    import struct
    from pathlib import Path

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(Path(folder).rglob("*tfevents*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_one_run_per_student_with_its_curve_and_config(tmp_path):
    cfg = load_config(None, [f"runtime.storage_path={tmp_path}", "runtime.tracking=[tensorboard, mlflow]"])
    for _ in range(2):  # logged twice (a rerun): still one run
        track(cfg, "students", "student-a", "student-a", {"lr": 0.05, "model_args": {"hidden": [8]}}, HISTORY,
              {"val_accuracy": 0.75, "test_accuracy": float("nan")})
    client, runs = _runs(cfg)
    assert len(runs) == 1 and runs[0].data.params["lr"] == "0.05"
    curve = client.get_metric_history(runs[0].info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in curve] == [(1, 0.5), (2, 0.75)]
    assert "final_test_accuracy" not in runs[0].data.metrics  # NaN is not logged
    artifact = client.download_artifacts(runs[0].info.run_id, "config.yaml", str(tmp_path / "dl"))
    assert load_config(artifact).name == "digits"  # the resolved config, loadable as is
    curves = scalars(tmp_path / "digits" / "tensorboard" / "students" / "student-a")
    assert curves["val_accuracy"] == [(1, 0.5), (2, 0.75)] and curves["final/val_accuracy"] == [(0, 0.75)]


def test_the_resolved_config_is_saved(tmp_path):
    cfg = load_config(None, [f"runtime.storage_path={tmp_path}", "student.lr=0.2"])
    path = save_config(cfg)
    assert path == str(tmp_path / "digits" / "config.yaml")
    assert load_config(path).student.lr == 0.2


def test_mlflow_on_an_object_store_needs_a_tracking_uri():
    with pytest.raises(ConfigError, match=r"runtime\.mlflow_uri: MLflow's file store needs a folder"):
        load_config(None, ["runtime.storage_path=s3://bucket/runs", "runtime.tracking=[mlflow]"])
    cfg = load_config(None, ["runtime.storage_path=s3://bucket/runs", "runtime.tracking=[mlflow]",
                             "runtime.mlflow_uri=http://mlflow.internal:5000"])
    assert mlflow_uri(cfg) == "http://mlflow.internal:5000"


def wandb_records(folder) -> list:
    """The records of W&B's offline run files under ``folder`` (LevelDB log framing after a 7-byte
    ":W&B" header: 32 KiB blocks of [crc 4, length 2, type 1] chunks, each record a protobuf)."""
    from pathlib import Path

    from wandb.proto.wandb_internal_pb2 import Record

    out = []
    for f in sorted(Path(folder).rglob("run-*.wandb")):
        raw, pos, buf = f.read_bytes(), 7, b""
        while pos + 7 <= len(raw):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            n, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
            buf, pos = buf + raw[pos + 7:pos + 7 + n], pos + 7 + n
            if kind in (1, 4):  # a full record, or the last chunk of one
                out.append(Record.FromString(buf))
                buf = b""
    return out


def test_wandb_offline_run_with_the_same_metrics(tmp_path, monkeypatch):
    import json
    import time

    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config(None, [f"runtime.storage_path={tmp_path}", "runtime.tracking=[wandb]",
                             "runtime.wandb_project=kd"])
    track(cfg, "students", "student-a", "student-a", {"lr": 0.05}, HISTORY, {"val_accuracy": 0.75})
    deadline = time.time() + 60  # W&B's service process writes the run file after finish() returns
    records = wandb_records(tmp_path / "digits" / "wandb")  # offline: no network, files in the experiment
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.time() < deadline, "no complete offline W&B run under <storage>/<name>/wandb"
        time.sleep(0.5)
        records = wandb_records(tmp_path / "digits" / "wandb")
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].project == "kd" and runs[0].display_name == "student student-a"
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    assert [(h["_step"], h["val_accuracy"]) for h in history] == [(1, 0.5), (2, 0.75)]
    summary = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for r in records
               if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}
    assert summary["final_val_accuracy"] == 0.75
