"""Stage 5: the sweep's report -- the paper's Table 5 shape, the gap recovered, a plot.

Pure pandas/matplotlib over ``results.parquet`` and ``sweep.json`` (written by
:mod:`kd_ray.stages.sweep`), so ``kd-ray report`` can redraw it any time without Ray.

Gap recovered (per fraction) = (soft - hard) / (ensemble - hard), on test accuracy: 0 means soft
targets bought nothing over hard labels on the same rows, 1 means the student on that fraction
matched the full-data ensemble (the paper's speech result at 3 % is 0.87). "hard" is the stronger
hard-label baseline at that fraction, chosen on validation accuracy when the sweep ran several
(plain, and with the soft trials' augmentation). Of several soft settings, one per fraction and
teaching mode is chosen on mean validation accuracy; the others are listed as "not chosen". Where the ensemble leads that baseline by fewer
than MIN_GAP_ERRORS test errors the ratio is noise over noise: "not measurable".
"""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd

from kd_ray.core import storage
from kd_ray.core.student_losses import loss_class

METRIC = "test_accuracy"
# Below this ensemble-over-hard margin in test errors the gap is "not measurable" (without the
# test split's size, 0.2 accuracy points)
MIN_GAP_ERRORS = 5
MIN_GAP = 0.002
CHOOSER = "val_accuracy"  # what picks the stronger hard baseline per fraction


def _setting(row, with_epochs: bool, with_lr: bool = False) -> str:
    """"hard", or the soft setting: its teaching mode ("soft" for cached), T, alpha (and the
    epoch budget and learning rate when the sweep has several)."""
    lr = f" lr={row['lr']:g}" if with_lr else ""
    if row["targets"] == "hard":  # plain, or with a soft mode's augmentation (matched baseline)
        mode = row.get("teaching", "none")
        aug = "" if mode in ("none", "cached", None) or pd.isna(mode) else f" ({mode} views)"
        return "hard" + aug + lr + (f" {int(row['epochs'])} ep" if with_epochs and aug else "")
    mode = row.get("teaching", "cached")
    label = "soft" if mode in ("cached", None) or pd.isna(mode) else mode
    loss = row.get("loss", "kd")
    if loss_class(loss).uses_temperature:
        label += f" T={row['temperature']:g}"
    label += f" a={row['alpha']:g}" + ("" if loss == "kd" else " " + _loss_label(loss, row.get("loss_args")))
    return label + lr + (f" {int(row['epochs'])} ep" if with_epochs else "")


def _loss_label(loss: str, args) -> str:
    """A soft loss other than kd and its parameters: "dkd(nckd=8, tckd=1)", "logit matching"."""
    args = json.loads(args) if isinstance(args, str) else {}
    return loss.replace("_", " ") + (f"({', '.join(f'{k}={v:g}' for k, v in args.items())})" if args else "")


def _finished(df: pd.DataFrame) -> pd.DataFrame:
    """The finished trials, each with its setting label (see :func:`_setting`)."""
    done = df[df["status"] == "done"].copy()
    if not done.empty:
        soft = done[done["targets"] == "soft"]
        with_epochs = "epochs" in done and soft["epochs"].nunique() > 1
        with_lr = "lr" in df and df["lr"].nunique() > 1
        done["setting"] = done.apply(_setting, axis=1, with_epochs=with_epochs, with_lr=with_lr)
    return done


def summarize(df: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Mean +- std over seeds of ``metric`` per (fraction, setting); finished trials only."""
    done = _finished(df)
    if done.empty:
        return pd.DataFrame(columns=["fraction", "setting", "targets", "mean", "std", "seeds", "train_rows"])
    g = done.groupby(["fraction", "setting", "targets"], sort=True)
    out = g[metric].agg(["mean", "std", "count"]).rename(columns={"count": "seeds"}).reset_index()
    out["std"] = out["std"].fillna(0.0)
    out["train_rows"] = g["train_rows_total"].first().to_numpy()
    return out


def gap_recovered(df: pd.DataFrame, ensemble: float, metric: str = METRIC, min_gap: float = MIN_GAP) -> pd.DataFrame:
    """Per fraction and soft setting: (soft - hard) / (ensemble - hard), against the stronger hard
    baseline of that fraction (the highest mean validation accuracy; the test split chooses nothing).

    ``gap`` uses the means over seeds; ``gap_std`` is the spread of the same ratio computed per
    seed (soft and hard trials of one seed share their rows, so they pair up). ``gap`` is NaN
    where the ensemble leads the baseline by less than ``min_gap``.
    """
    done = _finished(df)
    cols = ["fraction", "setting", "soft", "hard", "baseline", "ensemble", "gap", "gap_std", "seeds", "teaching",
            "val", "chosen"]
    if done.empty:
        return pd.DataFrame(columns=cols)
    hard_rows = done[done["targets"] == "hard"]
    rows = []
    for (fraction, setting), grp in done[done["targets"] == "soft"].groupby(["fraction", "setting"], sort=True):
        candidates = hard_rows[hard_rows["fraction"] == fraction]
        if candidates.empty:
            continue
        chooser = CHOOSER if CHOOSER in candidates and candidates[CHOOSER].notna().any() else None
        baseline = (candidates.groupby("setting")[chooser].mean().idxmax() if chooser
                    else candidates["setting"].iloc[0])
        h = candidates[candidates["setting"] == baseline].groupby("seed")[metric].mean()
        per_seed = [(s - h[seed]) / (ensemble - h[seed]) for seed, s in zip(grp["seed"], grp[metric])
                    if seed in h.index and ensemble - h[seed] >= min_gap]
        soft_mean, hard_mean = float(grp[metric].mean()), float(h.mean())
        denom = ensemble - hard_mean
        rows.append({"fraction": fraction, "setting": setting, "soft": soft_mean, "hard": hard_mean,
                     "baseline": baseline, "ensemble": ensemble,
                     "gap": (soft_mean - hard_mean) / denom if denom >= min_gap else float("nan"),
                     "gap_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
                     "seeds": len(grp), "teaching": str(grp["teaching"].iloc[0]) if "teaching" in grp else "cached",
                     "val": float(grp[CHOOSER].mean()) if CHOOSER in grp else float("nan")})
    out = pd.DataFrame(rows, columns=cols)
    return choose_settings(out)


def choose_settings(gaps: pd.DataFrame) -> pd.DataFrame:
    """Mark, per fraction and teaching mode, the one soft setting with the highest mean validation
    accuracy (``chosen``); the test split chooses nothing. Chosen rows come first."""
    if gaps.empty:
        return gaps.assign(chosen=pd.Series(dtype=bool))
    best = gaps.fillna({"val": -np.inf}).groupby(["fraction", "teaching"])["val"].idxmax()
    gaps = gaps.assign(chosen=gaps.index.isin(best.to_numpy()))
    return gaps.sort_values(["fraction", "chosen", "setting"], ascending=[True, False, True]).reset_index(drop=True)


def _md_table(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def summary_markdown(df: pd.DataFrame, info: dict, metric: str = METRIC) -> str:
    """``summary.md``: the Table-5-shaped table, the reference lines and the gap recovered."""
    ens = float(info["ensemble_test_accuracy"])
    teachers = info.get("teacher_test_accuracy") or []
    s = summarize(df, metric)
    table = pd.DataFrame({
        "fraction": [_pct(f) for f in s["fraction"]],
        "train rows": s["train_rows"].astype(int), "targets": s["setting"],
        f"{metric} (mean +- std)": [f"{m:.4f} +- {d:.4f}" for m, d in zip(s["mean"], s["std"])],
        "seeds": s["seeds"]})
    test_rows = info.get("test_rows")
    min_gap = MIN_GAP_ERRORS / test_rows if test_rows else MIN_GAP
    gaps = gap_recovered(df, ens, metric, min_gap)
    unmeasurable = (f"not measurable (the ensemble leads by fewer than {MIN_GAP_ERRORS} of {test_rows} test images)"
                    if test_rows else f"not measurable (the ensemble leads by less than {MIN_GAP:.1%})")
    gap_table = pd.DataFrame({
        "fraction": [_pct(f) for f in gaps["fraction"]], "soft setting": gaps["setting"],
        "soft": [f"{v:.4f}" for v in gaps["soft"]], "hard": [f"{v:.4f}" for v in gaps["hard"]],
        "baseline (chosen on validation)": gaps["baseline"],
        "soft setting chosen on validation": ["chosen" if c else "not chosen" for c in gaps["chosen"]],
        "gap recovered (+- std over seeds)": [
            f"{g:.1%} +- {d:.1%}" if np.isfinite(g) else
            ("not measurable (the ensemble is below this baseline)" if ens < h else unmeasurable)
            for g, d, h in zip(gaps["gap"], gaps["gap_std"], gaps["hard"])]})
    pivot = gap_pivot(gaps)
    counts = df["status"].value_counts().to_dict()
    lines = [
        f"# Sweep summary ({metric}, mean +- std over seeds)", "",
        f"Ensemble of {info.get('teachers', len(teachers))} teachers: {ens:.4f}"
        + (f"; single teacher: {np.mean(teachers):.4f} (range {min(teachers):.4f}-{max(teachers):.4f})"
           if teachers else "")
        + f". Soft targets at T={info.get('temperature')} ({info.get('rule')} averaging), "
          f"{info.get('transfer_rows')} transfer rows." + _training_note(info, df), "",
        "Every trial reports the test figures of its best validation epoch (val_accuracy); the test "
        "split chose nothing.", "",
        f"Trials: {len(df)} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})"
        + ("" if info.get("complete", True) else " -- the sweep is INCOMPLETE: run it again to finish") + ".", "",
        _md_table(table), "",
        "## Gap recovered: (soft - hard) / (ensemble - hard)", "",
        _md_table(gap_table) if len(gap_table) else "(needs soft and hard trials at the same fraction)", "",
    ]
    diverged = df[df["status"] == "diverged"]
    if len(diverged):  # shown, not dropped: their settings have no accuracy above
        table = pd.DataFrame({"fraction": [_pct(f) for f in diverged["fraction"]],
                              "setting": [_setting(r, False, "lr" in df and df["lr"].nunique() > 1)
                                          for _, r in diverged.iterrows()],
                              "seed": diverged["seed"].astype(int),
                              "diverged in epoch": diverged["diverged_epoch"].astype(int)})
        lines += ["## Diverged trials (the training loss became NaN or infinite; no test figures)", "",
                  _md_table(table), "",
                  "Lower student.lr or student.grad_clip_norm and run the sweep again under a new setting.", ""]
    if len(pivot) > 1:  # several soft settings (teaching modes, epoch budgets): side by side
        lines += ["## Gap recovered per setting and fraction (mean +- std over seeds)", "", _md_table(pivot), ""]
    return "\n".join(lines)


def _pct(f: float) -> str:
    return f"{f:.0%}" if f >= 0.1 else f"{f:.1%}"


def gap_pivot(gaps: pd.DataFrame) -> pd.DataFrame:
    """The gap recovered as a table: one row per soft setting, one column per fraction."""
    if gaps.empty:
        return pd.DataFrame()
    fractions = sorted(gaps["fraction"].unique())
    rows = []
    for setting, grp in gaps.groupby("setting", sort=True):
        by = grp.set_index("fraction")
        row = {"setting": setting}
        for f in fractions:
            g = by["gap"].get(f, float("nan"))
            row[_pct(f)] = f"{g:.1%} +- {by['gap_std'][f]:.1%}" if np.isfinite(g) else "n/a"
        rows.append(row)
    return pd.DataFrame(rows)


def plot_gap(gaps: pd.DataFrame) -> bytes:
    """``gap_vs_fraction.png``: the gap recovered vs the data fraction, one curve per soft
    setting, per-seed spread as error bars, log x axis. Returns the PNG bytes."""
    fig, ax = _new_plot()
    for setting, grp in gaps.dropna(subset=["gap"]).groupby("setting", sort=True):
        ax.errorbar(grp["fraction"], 100 * grp["gap"], yerr=100 * grp["gap_std"], marker="o", capsize=3,
                    label=setting)
    ax.axhline(100, color="black", linewidth=1, label="ensemble (100 %)")
    ax.axhline(0, color="gray", linestyle="--", linewidth=1, label="hard labels (0 %)")
    return _fraction_plot_png(fig, ax, sorted(gaps["fraction"].unique()),
                              "gap recovered, % (soft - hard) / (ensemble - hard)",
                              "Share of the hard-label-to-ensemble gap recovered")


def plot_accuracy(df: pd.DataFrame, info: dict, metric: str = METRIC) -> bytes:
    """``accuracy_vs_fraction.png``: soft and hard curves with error bars, ensemble and
    single-teacher lines, log x axis. Returns the PNG bytes."""
    s = summarize(df, metric)
    fig, ax = _new_plot()
    for setting, grp in s.groupby("setting", sort=True):
        ax.errorbar(grp["fraction"], grp["mean"], yerr=grp["std"], marker="o", capsize=3,
                    linestyle="--" if setting == "hard" else "-", label=setting)
    ax.axhline(float(info["ensemble_test_accuracy"]), color="black", linewidth=1, label="ensemble")
    teachers = info.get("teacher_test_accuracy") or []
    if teachers:
        ax.axhline(float(np.mean(teachers)), color="gray", linestyle=":", linewidth=1, label="single teacher (mean)")
    return _fraction_plot_png(fig, ax, sorted(s["fraction"].unique()) if len(s) else [],
                              metric.replace("_", " "), "Student accuracy vs data fraction")


def _training_note(info: dict, df: pd.DataFrame) -> str:
    """The summary's sentences on augmentation and patience (empty when the sweep used neither).
    Shifts and mixup are named only when trials used them (a cached-only sweep of a config with
    mixup set trains on the original images)."""
    modes = set(df["teaching"]) if "teaching" in df else {"inconsistent", "consistent"}
    note = ""
    if info.get("jitter") and modes & {"inconsistent", "consistent"}:
        note += f" Augmentation (inconsistent, consistent): shifts up to {info['jitter']} px."
    if info.get("mixup") and "consistent" in modes:
        note += f" Consistent teaching mixes images, weight ~ Beta({info['mixup']:g}, {info['mixup']:g})."
    if info.get("min_steps"):
        note += f" At least {info['min_steps']} optimizer steps per student (student.min_steps)."
    if info.get("init") == "teacher":
        note += (" Every student, hard ones too, starts from a copy of ensemble member seed % K"
                 " (student.init: teacher).")
    return note


def _new_plot():
    """A figure and axes for the report's plots (headless backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.4), dpi=110)


def _fraction_plot_png(fig, ax, fractions: list[float], ylabel: str, title: str) -> bytes:
    """Finish a plot over data fractions (log x axis, one tick per fraction) and return its PNG bytes."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    if fractions:
        ax.set_xticks(fractions)
        ax.set_xticklabels([_pct(f) for f in fractions])
        ax.minorticks_off()
    ax.set_xlabel("fraction of the training data (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(out: str, df: pd.DataFrame | None = None, info: dict | None = None) -> str:
    """Write ``summary.md``, ``accuracy_vs_fraction.png`` and (with soft and hard trials)
    ``gap_vs_fraction.png`` under ``out``; return the summary."""
    if df is None or info is None:
        from kd_ray.stages.sweep import load_results

        df, info = load_results(out)
    text = summary_markdown(df, info)
    storage.write_bytes(storage.join(out, "summary.md"), text.encode())
    storage.write_bytes(storage.join(out, "accuracy_vs_fraction.png"), plot_accuracy(df, info))
    gaps = gap_recovered(df, float(info["ensemble_test_accuracy"]))
    if len(gaps):
        storage.write_bytes(storage.join(out, "gap_vs_fraction.png"), plot_gap(gaps))
    return text
