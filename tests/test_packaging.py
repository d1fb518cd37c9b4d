"""The installed package works without the checkout: a wheel in a fresh venv, run from elsewhere."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """kd_ray's wheel installed into a fresh venv outside the checkout. Its dependencies (torch,
    Ray: gigabytes) come from this environment's site-packages through a .pth line; kd_ray itself
    only from the wheel (the checkout is neither on the path nor the working directory)."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(ROOT)], check=True)
    wheel = next((root / "dist").glob("kd_ray-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True)
    work = root / "elsewhere"
    work.mkdir()
    return venv / "bin", work


def _run(bindir, work, *args, timeout=120):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(bindir / "kd-ray"), *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_carries_the_shipped_configs(installed):
    bindir, work = installed
    where = subprocess.run([str(bindir / "python"), "-c", "import kd_ray; print(kd_ray.__file__)"], cwd=work,
                           capture_output=True, text=True, check=True).stdout
    assert str(ROOT) not in where  # the wheel's copy, not the checkout's
    listed = _run(bindir, work, "configs")
    assert listed.returncode == 0 and "digits" in listed.stdout and "mnist_paper" in listed.stdout
    shown = _run(bindir, work, "config", "show")
    assert shown.returncode == 0 and "name: digits" in shown.stdout and "hidden:\n    - 1200" in shown.stdout
    assert _run(bindir, work, "init", "mine", "--from", "fashion_mnist").returncode == 0
    assert "name: mine" in (work / "mine.yaml").read_text()
    missing = _run(bindir, work, "config", "show", "no_such_config")
    assert missing.returncode == 2 and "shipped configs, usable by name" in missing.stderr
    # the licence a user's legal review looks for travels with the wheel
    licence = subprocess.run([str(bindir / "python"), "-c", "from importlib.metadata import distribution as d; "
                              "f = [p for p in d('kd_ray').files if p.name == 'LICENSE'][0]; print(f.read_text())"],
                             cwd=work, capture_output=True, text=True, check=True).stdout
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.isolated
def test_a_tiny_run_from_another_directory_with_the_shipped_default(installed, no_ray):
    bindir, work = installed
    out = _run(bindir, work, "run", "--set", "runtime.storage_path=./runs", "--set", "runtime.num_cpus=2",
               "--set", "teachers.count=1", "--set", "teachers.epochs=1", "--set", "teachers.model_args={hidden: [16]}",
               "--set", "student.epochs=1", "--set", "student.model_args={hidden: [16]}",
               "--set", "sweep.fractions=[1.0]", "--set", "sweep.targets=[soft]", "--set", "sweep.seeds=[0]",
               timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kd-ray run finished in" in out.stdout
    assert (work / "runs" / "digits" / "summary.md").exists()
