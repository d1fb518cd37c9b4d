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
