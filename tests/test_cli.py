"""The command line without Ray: config show, overrides and error reporting."""
import yaml

from kd_ray.cli import main


def test_config_show_prints_the_resolved_config(capsys):
    assert main(["config", "show", "kd_ray/configs/digits.yaml", "--set", "soft_targets.temperature=3",
                 "--set", "sweep.fractions=[0.1, 1.0]"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["soft_targets"]["temperature"] == 3
    assert shown["sweep"]["fractions"] == [0.1, 1.0]
    assert shown["name"] == "digits" and shown["data"]["name"] == "digits"


def test_bad_config_exits_2_and_names_the_field(capsys):
    assert main(["config", "show", "--set", "student.alpha=3"]) == 2
    err = capsys.readouterr().err
    assert "student.alpha" in err and "less than or equal to 1" in err
    assert main(["teachers", "no/such/config.yaml"]) == 2
    assert "config file not found: no/such/config.yaml" in capsys.readouterr().err


def test_front_door_errors_are_one_line_each_and_exit_2(capsys):
    assert main(["config", "show", "--set", "sweep.fractions=[0.1,"]) == 2  # a YAML error inside --set
    err = capsys.readouterr().err
    assert "--set sweep.fractions: the value '[0.1,' is not valid YAML" in err and "Traceback" not in err
    assert main(["config", "show", "--set", "teachers.specs=[{model: cnn, lr: -1, epochs: 0}]",
                 "--set", "teachers.count=1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "  teachers.specs[0].epochs: Input should be greater than 0" in err
    assert "  teachers.specs[0].lr: Input should be greater than 0" in err
    assert main(["config", "show", "--set", "sweep.metric=test_accuracy"]) == 2  # the test split never chooses
    assert "is a test metric: the test split never chooses anything" in capsys.readouterr().err


def test_an_imported_teacher_that_does_not_fit_fails_before_ray_starts(tmp_path, capsys, monkeypatch):
    import torch

    import kd_ray.stages.cluster

    def no_ray(cfg):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(kd_ray.stages.cluster, "init_ray", no_ray)
    three = tmp_path / "three_classes.pt"
    torch.save(torch.nn.Linear(64, 3).state_dict(), three)
    rc = main(["teachers", "--set", f"runtime.storage_path={tmp_path}", "--set", "teachers.count=1", "--set",
               f"teachers.specs=[{{checkpoint: '{three}', model: 'tests.fixtures.factories:tiny_net'}}]"])
    err = capsys.readouterr().err
    assert rc == 2 and "teachers.specs[0].checkpoint" in err and "three_classes.pt" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
