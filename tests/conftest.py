"""One local Ray cluster for the whole session (Ray takes 20-35 s to start here).

It declares more logical CPUs than the machine has (sweeps hold a CPU per trial driver) and
two logical GPUs, so GPU-aware scheduling is tested while torch runs on the CPU. Tests marked
``isolated`` start their own Ray instance: they run last, after the shared cluster is shut
down, because two Ray instances on one machine break Ray Train (DESIGN.md).
"""
import os

import pytest

from tests.fixtures.network import free_port

pytest_plugins = ["tests.fixtures.fake_cluster"]  # the fake_cluster fixture

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # see kd_ray/cluster.py

SHARED_CPUS = 8
SHARED_GPUS = 2


def pytest_collection_modifyitems(config, items):
    # isolated tests go last, in their original order
    items.sort(key=lambda item: item.get_closest_marker("isolated") is not None)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    def start():
        if not ray.is_initialized():
            ray.init(num_cpus=SHARED_CPUS, num_gpus=SHARED_GPUS, include_dashboard=True,
                     dashboard_host="127.0.0.1", log_to_driver=True)
        return ray

    yield start
    ray.shutdown()


@pytest.fixture
def ray_session(ray_cluster):
    """Use the shared cluster (started on first use)."""
    return ray_cluster()


@pytest.fixture
def no_ray():
    """For isolated tests: the shared cluster is shut down first and after."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


@pytest.fixture
def digits_cfg(tmp_path):
    """A tiny digits experiment writing under a fresh storage folder."""
    from kd_ray.core.config_files import load_config

    def make(*overrides):
        return load_config(None, [
            f"runtime.storage_path={tmp_path / 'runs'}",
            "teachers.count=2", "teachers.epochs=2", "teachers.model_args={hidden: [64]}",
            "teachers.batch_size=128", "student.epochs=2", "student.use_gpu=false", *overrides,
        ])
    return make


@pytest.fixture(scope="session")
def tiny_ensemble(ray_cluster, tmp_path_factory):
    """Three small digits teachers, trained once per session: (config, EnsembleResult)."""
    from kd_ray.core.config_files import load_config
    from kd_ray.stages.teachers import train_ensemble

    ray_cluster()
    root = tmp_path_factory.mktemp("ensemble")
    cfg = load_config(None, [f"runtime.storage_path={root}", "name=tiny", "teachers.count=3",
                             "teachers.epochs=8", "teachers.model_args={hidden: [128]}", "teachers.lr=0.1",
                             "soft_targets.batch_size=256",
                             # the shared cluster's GPUs are logical: students stay CPU workers here
                             # (test_sweep's `kd-ray run` test trains GPU workers on them)
                             "student.use_gpu=false"])
    return cfg, train_ensemble(cfg)


@pytest.fixture
def interrupt():
    """``interrupt(after=n)``: a Tune callback that presses Ctrl+C (SIGUSR1, which Tune treats the
    same) once ``n`` trials have completed."""
    import signal

    from ray import tune

    class Interrupt(tune.Callback):
        def __init__(self, after):
            self.after, self.done = after, 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            if self.done == self.after:
                os.kill(os.getpid(), signal.SIGUSR1)

    return Interrupt


@pytest.fixture
def s3(monkeypatch):
    """A real S3 endpoint on 127.0.0.1 with one bucket, reached through the standard AWS variables
    (set before any Ray process starts, so actors and Train workers inherit them)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="kd-runs")
    try:
        yield "s3://kd-runs"
    finally:
        server.stop()


@pytest.fixture
def head_process():
    """``start(args, env, temp)``: `ray start --head --block ARGS` in its own process group, logging to
    ``temp/head.log``; at the end the fixture stops that group (SIGTERM, SIGKILL after 10 s: only
    what the test started; a head drains for ~30 s and nothing here needs the drain) and removes
    ``temp``."""
    import shutil
    import signal
    import subprocess
    import sys
    from pathlib import Path

    started = []

    def start(args, env, temp):
        log = open(Path(temp) / "head.log", "w")
        proc = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", *args],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started.append((proc, log, temp))
        return proc

    yield start
    for proc, log, temp in started:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
