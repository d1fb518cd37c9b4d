"""Config validation: every bad value names its field; unknown keys and missing files are named."""
from pathlib import Path

import pytest

from kd_ray.core.config import ConfigError, ExperimentConfig
from kd_ray.core.config_files import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "kd_ray" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert len(cfg.teachers.resolved()) >= 1


def test_shipped_config_set_includes_the_required_ones():
    names = {p.name for p in CONFIGS}
    assert {"digits.yaml", "fashion_mnist.yaml", "mnist_paper.yaml", "cifar10_gpu.yaml", "digits_consistent.yaml",
            "fashion_mnist_consistent.yaml"} <= names


def test_paper_mnist_config():
    cfg = load_config("mnist_paper")
    assert cfg.teachers.model_args["hidden"] == [1200, 1200]
    assert cfg.teachers.model_args["dropout"] > 0
    assert cfg.teachers.jitter == 2
    assert cfg.student.model_args["hidden"] == [800, 800]
    assert cfg.soft_targets.temperature == 20


def test_defaults_and_overrides():
    cfg = load_config(None, ["soft_targets.temperature=2.5", "sweep.fractions=[0.1, 1.0]", "teachers.count=3"])
    assert cfg.soft_targets.temperature == 2.5
    assert cfg.sweep.fractions == [0.1, 1.0]
    assert [t.seed for t in cfg.teachers.resolved()] == [0, 1, 2]


@pytest.mark.parametrize("override, field", [
    ("soft_targets.temperature=0", "soft_targets.temperature"),
    ("soft_targets.temperature=-1", "soft_targets.temperature"),
    ("student.temperature=0", "student.temperature"),
    ("student.alpha=1.5", "student.alpha"),
    ("student.alpha=-0.1", "student.alpha"),
    ("sweep.fractions=[0.0]", "sweep.fractions"),
    ("sweep.fractions=[1.5]", "sweep.fractions"),
    ("sweep.fractions=[]", "sweep.fractions"),
    ("sweep.alphas=[2]", "sweep.alphas"),
    ("sweep.metric=loss", "sweep.metric"),
    ("teachers.count=0", "teachers.count"),
    ("teachers.epochs=0", "teachers.epochs"),
    ("teachers.batch_size=-4", "teachers.batch_size"),
    ("student.epochs=0", "student.epochs"),
    ("student.batch_size=0", "student.batch_size"),
    ("soft_targets.batch_size=0", "soft_targets.batch_size"),
    ("teachers.model=vit", "teachers.model"),
    ("student.model=vit", "student.model"),
    ("data.name=imagenet", "data.name"),
    ("soft_targets.rule=median", "soft_targets.rule"),
    ("soft_targets.precision=float16", "soft_targets.precision"),
    ("data.val_fraction=1.0", "data.val_fraction"),
    ("soft_targets.views_fraction=0", "soft_targets.views_fraction"),
    ("data.normalization={mean: [0.5], std: [0.2, 0.3]}", "data.normalization"),
    ("data.normalization={mean: [0.5], std: [0]}", "data.normalization"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert field in str(e.value)


def test_unknown_key_rejected():
    with pytest.raises(ConfigError, match=r"student\.temprature: unknown key"):
        load_config(None, ["student.temprature=3"])


def test_missing_file_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_heterogeneous_teachers(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("teachers:\n  model: mlp\n  specs:\n    - {model: cnn, lr: 0.01}\n    - {model_args: {hidden: [64]}}\n")
    specs = load_config(p).teachers.resolved()
    assert [s.model for s in specs] == ["cnn", "mlp"]
    assert specs[0].lr == 0.01 and specs[1].model_args == {"hidden": [64]}
    with pytest.raises(ConfigError, match="teachers.specs"):
        load_config(p, ["teachers.specs=[{model: vit}]"])
    with pytest.raises(ConfigError, match="teachers.count"):
        load_config(p, ["teachers.count=5"])


def test_cached_views_fractions_must_fit_the_views_cache():
    views = ["soft_targets.views=8", "soft_targets.jitter=1", "sweep.teaching=[cached_views]",
             "soft_targets.views_fraction=0.1"]
    assert load_config(None, [*views, "sweep.fractions=[0.03, 0.1]"]).soft_targets.views_fraction == 0.1
    with pytest.raises(ConfigError, match=r"soft_targets.views_fraction: .*fractions up to 0.3 .* holds 0.1 of the rows"):
        load_config(None, [*views, "sweep.fractions=[0.03, 0.3]"])


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["student.alpha"])


def test_a_streamed_source_is_parquet_or_a_folder_and_says_which_modes_need_memory():
    stream = ["data.name=parquet", "data.root=s3://bucket/data", "data.stream=true"]
    assert load_config(None, stream).data.stream
    assert load_config(None, ["data.name=image_folder", "data.root=/images", "data.stream=true"]).data.stream
    with pytest.raises(ConfigError, match=r"streamed sources are parquet or image_folder; data.name is 'digits'"):
        load_config(None, ["data.stream=true"])
    shifts = load_config(None, [*stream, "sweep.teaching=[cached, inconsistent, consistent]", "soft_targets.jitter=1"])
    assert shifts.sweep.teaching == ["cached", "inconsistent", "consistent"]
    with pytest.raises(ConfigError, match=r"data.stream: consistent teaching does not stream: a mixed view's partner"):
        load_config(None, [*stream, "sweep.teaching=[consistent]", "soft_targets.mixup=1.0"])
    views = load_config(None, [*stream, "sweep.teaching=[cached_views]", "soft_targets.views=2", "soft_targets.jitter=1"])
    assert views.sweep.teaching == ["cached_views"]
    with pytest.raises(ConfigError, match=r"data.stream: cached_views teaching does not stream: a mixed view"):
        load_config(None, [*stream, "sweep.teaching=[cached_views]", "soft_targets.views=2", "soft_targets.mixup=1.0"])
    with pytest.raises(ConfigError, match=r"data.stream: a mixed view's partner"):
        load_config(None, [*stream, "soft_targets.views=2", "soft_targets.mixup=1.0"])
    # bootstrapped and imported teachers stream too (a Poisson(1) resample; checked on a few rows)
    assert load_config(None, [*stream, "teachers.bootstrap=true"]).teachers.bootstrap
