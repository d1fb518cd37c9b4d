"""Progress lines a user sees without --verbose (no Ray cluster needed)."""
import time

from kd_ray.stages.progress import Heartbeat


def test_a_line_per_finished_unit_with_k_of_n_elapsed_and_an_eta():
    lines = []
    heart = Heartbeat("sweep", total=3, already=1, printer=lines.append)
    heart.finished("f0.1-soft-s0", "val_accuracy 0.9500")
    assert lines[-1].startswith("[kd_ray] sweep 2/3 f0.1-soft-s0: val_accuracy 0.9500; elapsed ")
    assert "ETA" in lines[-1]
    heart.finished("f0.1-hard-s0")
    assert lines[-1].startswith("[kd_ray] sweep 3/3 f0.1-hard-s0; elapsed ") and "ETA" not in lines[-1]


def test_a_heartbeat_only_after_a_quiet_interval_naming_what_runs():
    lines = []
    heart = Heartbeat("teachers", total=2, every=3600, printer=lines.append)
    heart.running = {"teacher t0": "epoch 3", "teacher t1": ""}
    heart.beat()
    assert lines == []  # nothing quiet for long yet
    heart.every = 0
    heart.beat()
    assert lines[-1].startswith("[kd_ray] teachers still running: 0/2 done after ")
    assert "teacher t0 (epoch 3); teacher t1" in lines[-1]


def test_the_background_heartbeat_prints_until_stopped():
    lines = []
    heart = Heartbeat("soft-targets", total=1, every=0.05, printer=lines.append)
    heart.start()
    time.sleep(0.3)  # the thread wakes every min(5 s, every)
    heart.stop()
    n = len(lines)
    time.sleep(0.2)
    assert n >= 1 and len(lines) == n
