"""The report without Ray: the Table-5 summary, the gap recovered, the PNG."""
import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from kd_ray.report import gap_recovered, summarize, write_report

INFO = {"ensemble_test_accuracy": 0.90, "teacher_test_accuracy": [0.85, 0.87], "teachers": 2,
        "temperature": 4.0, "rule": "probs", "transfer_rows": 1000, "complete": True}


def _results() -> pd.DataFrame:
    rows = []
    acc = {(0.1, "hard"): [0.60, 0.70], (0.1, "soft"): [0.80, 0.84], (1.0, "hard"): [0.88, 0.88],
           (1.0, "soft"): [0.89, 0.89]}
    for (fraction, targets), values in acc.items():
        for seed, a in enumerate(values):
            rows.append({"fraction": fraction, "targets": targets, "temperature": 4.0,
                         "alpha": 0.9 if targets == "soft" else 0.0, "seed": seed, "test_accuracy": a,
                         "train_rows_total": int(1000 * fraction), "status": "done"})
    rows.append({**rows[0], "seed": 2, "test_accuracy": float("nan"), "status": "unfinished"})
    return pd.DataFrame(rows)


def test_summary_is_mean_and_std_over_seeds_of_finished_trials():
    s = summarize(_results()).set_index(["fraction", "setting"])
    assert s.loc[(0.1, "hard"), "mean"] == pytest.approx(0.65)
    assert s.loc[(0.1, "hard"), "std"] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    assert s.loc[(0.1, "hard"), "seeds"] == 2  # the unfinished trial is left out
    assert s.loc[(0.1, "soft T=4 a=0.9"), "mean"] == pytest.approx(0.82)
    assert s.loc[(1.0, "hard"), "train_rows"] == 1000


def test_gap_recovered_is_soft_minus_hard_over_ensemble_minus_hard():
    g = gap_recovered(_results(), ensemble=0.90).set_index("fraction")
    assert g.loc[0.1, "gap"] == pytest.approx((0.82 - 0.65) / (0.90 - 0.65))
    per_seed = [(0.80 - 0.60) / 0.30, (0.84 - 0.70) / 0.20]
    assert g.loc[0.1, "gap_std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert g.loc[1.0, "gap"] == pytest.approx(0.5)


def test_report_writes_summary_and_a_png_that_opens(tmp_path):
    text = write_report(str(tmp_path), _results(), INFO)
    assert (tmp_path / "summary.md").read_text() == text
    assert "| 10% | 100 | hard | 0.6500 +- 0.0707 | 2 |" in text
    assert "68.0% +- " in text  # gap recovered at 10 %
    assert "single teacher: 0.8600" in text and "Ensemble of 2 teachers: 0.9000" in text
    assert "unfinished 1" in text
    assert "student.init" not in text  # students from scratch: nothing to say
    assert "starts from a copy of ensemble member seed % K" in write_report(str(tmp_path), _results(),
                                                                            {**INFO, "init": "teacher"})
    image = matplotlib.image.imread(tmp_path / "accuracy_vs_fraction.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200


def test_gap_recovered_per_teaching_mode_table_and_plot(tmp_path):
    df = _results()
    df["teaching"] = np.where(df["targets"] == "hard", "none", "cached")
    df["epochs"] = 40
    consistent = df[df["targets"] == "soft"].copy()
    consistent["teaching"] = "consistent"
    consistent["test_accuracy"] += 0.02
    df = pd.concat([df, consistent], ignore_index=True)
    g = gap_recovered(df, ensemble=0.90).set_index(["setting", "fraction"])
    assert g.loc[("soft T=4 a=0.9", 0.1), "gap"] == pytest.approx((0.82 - 0.65) / 0.25)
    assert g.loc[("consistent T=4 a=0.9", 0.1), "gap"] == pytest.approx((0.84 - 0.65) / 0.25)
    text = write_report(str(tmp_path), df, INFO)
    assert "## Gap recovered per setting and fraction" in text
    assert "| consistent T=4 a=0.9 | 76.0% +- " in text
    image = matplotlib.image.imread(tmp_path / "gap_vs_fraction.png")
    assert image.ndim == 3 and image.shape[0] > 200
    # mixup is named only where trials mixed: consistent ones, not a cached-only sweep
    mixed = {**INFO, "mixup": 0.2, "jitter": 1}
    assert "Beta(0.2, 0.2)" in write_report(str(tmp_path / "mixed"), df, mixed)
    cached_only = write_report(str(tmp_path / "mixed"), df[df["teaching"] != "consistent"], mixed)
    assert "Beta(" not in cached_only and "shifts up to" not in cached_only
    # several epoch budgets: each is its own setting
    longer = df[df["teaching"] == "consistent"].assign(epochs=200)
    labels = set(gap_recovered(pd.concat([df, longer]), 0.90)["setting"])
    assert {"consistent T=4 a=0.9 40 ep", "consistent T=4 a=0.9 200 ep", "soft T=4 a=0.9 40 ep"} <= labels


def test_gap_uses_the_stronger_hard_baseline_chosen_on_validation_and_says_when_not_measurable(tmp_path):
    df = _results()
    df["val_accuracy"] = df["test_accuracy"]
    df["teaching"] = np.where(df["targets"] == "hard", "none", "cached")
    matched = df[df["targets"] == "hard"].assign(teaching="inconsistent")
    matched["test_accuracy"] += 0.05  # better on test ...
    matched["val_accuracy"] -= 0.05  # ... but worse on validation: the plain baseline is chosen
    df = pd.concat([df, matched], ignore_index=True)
    g = gap_recovered(df, ensemble=0.90).set_index("fraction")
    assert g.loc[0.1, "baseline"] == "hard" and g.loc[0.1, "hard"] == pytest.approx(0.65)
    better = df.copy()
    better.loc[better["teaching"] == "inconsistent", "val_accuracy"] += 0.2
    g = gap_recovered(better, ensemble=0.90).set_index("fraction")
    assert g.loc[0.1, "baseline"] == "hard (inconsistent views)" and g.loc[0.1, "hard"] == pytest.approx(0.70)
    # at 100 % the ensemble leads hard labels by 0.02 = 2 of 100 test images: not measurable
    text = write_report(str(tmp_path), df, {**INFO, "test_rows": 100})
    assert "not measurable (the ensemble leads by fewer than 5 of 100 test images)" in text
    assert "| hard (inconsistent views) |" in text  # both baselines appear in the table


def test_one_soft_setting_per_fraction_and_mode_is_chosen_on_validation(tmp_path):
    df = _results()
    df["teaching"] = np.where(df["targets"] == "hard", "none", "cached")
    df["val_accuracy"] = df["test_accuracy"]
    other = df[df["targets"] == "soft"].assign(temperature=2.0)
    other["test_accuracy"] += 0.03  # better on test ...
    other["val_accuracy"] -= 0.03  # ... worse on validation: T=4 is chosen
    consistent = df[df["targets"] == "soft"].assign(teaching="consistent")  # its own mode: its own choice
    g = gap_recovered(pd.concat([df, other, consistent], ignore_index=True), ensemble=0.90)
    chosen = g[g["chosen"]].set_index(["fraction", "teaching"])["setting"]
    assert chosen[(0.1, "cached")] == "soft T=4 a=0.9" and chosen[(1.0, "cached")] == "soft T=4 a=0.9"
    assert chosen[(0.1, "consistent")] == "consistent T=4 a=0.9"
    assert set(g.loc[~g["chosen"], "setting"]) == {"soft T=2 a=0.9"}
    text = write_report(str(tmp_path), pd.concat([df, other], ignore_index=True), INFO)
    row_t4 = next(ln for ln in text.splitlines() if ln.startswith("| 10% | soft T=4 a=0.9 |"))
    row_t2 = next(ln for ln in text.splitlines() if ln.startswith("| 10% | soft T=2 a=0.9 |"))
    assert "| chosen |" in row_t4 and "| not chosen |" in row_t2
    assert text.index(row_t4) < text.index(row_t2)  # the chosen setting first
