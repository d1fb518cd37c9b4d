"""The documented commands stay true: every `kd-ray ...` and `python jobs/...` command quoted in
README.md and docs/*.md names a config that loads with its `--set` overrides (no Ray)."""
import re
import shlex
from pathlib import Path

import pytest

from kd_ray.cli import main
from kd_ray.core.config_files import shipped_configs

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```.*?```", re.S)  # fenced blocks hold usage lines with [OPTIONAL] parts
SPAN = re.compile(r"`([^`]+)`")  # inline code; wraps over lines in these files
PLACEHOLDER = re.compile(r"<[^>]*>")  # <run>, <fresh folder>, <N>: values the reader fills in


def documented_commands() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        text = FENCE.sub("", path.read_text())
        for span in SPAN.findall(text):
            command = " ".join(span.split())
            start = min((i for i in (command.find("kd-ray "), command.find("python jobs/")) if i >= 0), default=-1)
            if start < 0 or command.startswith("kd-ray export", start) or "..." in command:
                continue  # export takes a run folder; "..." marks a usage template, not a command
            out.append((path.name, PLACEHOLDER.sub("PLACEHOLDER", command[start:])))
    return out


def config_and_overrides(command: str) -> tuple[str | None, list[str]]:
    tokens = shlex.split(command)
    shipped = set(shipped_configs())
    config = next((t for t in tokens if t.endswith(".yaml") or t in shipped), None)
    sets = [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == "--set" and "PLACEHOLDER" not in tokens[i + 1]]
    return config, sets


COMMANDS = documented_commands()


def test_the_docs_quote_commands():
    # guards the extraction itself: the README's headline commands are among those checked
    quoted = {c for _, c in COMMANDS}
    assert len(COMMANDS) > 50
    assert "kd-ray run kd_ray/configs/fashion_mnist_cnn.yaml" in quoted
    assert any(c.startswith("python jobs/analysis/small_data_kd.py") for c in quoted)


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_documented_command_has_a_valid_config(doc, command, capsys):
    config, sets = config_and_overrides(command)
    if config is not None and config.endswith(".yaml"):
        assert (ROOT / config).is_file(), f"{doc} quotes a config that does not exist: {config}"
        config = str(ROOT / config)
    argv = ["config", "show", *([config] if config else []), *[a for s in sets for a in ("--set", s)]]
    rc = main(argv)
    assert rc == 0, f"{doc}: `{command}` does not load: {capsys.readouterr().err.strip()}"


def test_every_results_folder_backs_a_documented_figure():
    """A folder under docs/results/ stays only while some doc cites it (git keeps the others)."""
    text = "\n".join(p.read_text() for p in DOCS)
    unused = [d.name for d in sorted((ROOT / "docs" / "results").iterdir())
              if d.is_dir() and not re.search(rf"\b{re.escape(d.name)}\b", text)]
    assert not unused, f"results folders no doc cites: {unused}"


def _readme_table(title_start: str) -> list[list[str]]:
    """The cells of the first markdown table after the README paragraph starting ``title_start``."""
    text = (ROOT / "README.md").read_text()
    rows = []
    for line in text[text.index(title_start):].splitlines():
        if line.startswith("|---"):
            continue
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows[1:]


def test_the_readme_default_run_table_is_what_its_rows_give():
    """Every figure of the README's default-run table comes from docs/results/digits_default."""
    import json

    import pandas as pd

    from kd_ray.report import gap_recovered

    folder = ROOT / "docs" / "results" / "digits_default"
    df = pd.read_csv(folder / "results.csv")
    info = json.loads((folder / "sweep.json").read_text())
    gaps = gap_recovered(df, info["ensemble_test_accuracy"], min_gap=5 / info["test_rows"]).set_index("fraction")
    table = _readme_table("The default run (`kd-ray run`, digits")
    assert len(table) == df["fraction"].nunique() == 4
    for fraction, rows, hard, soft, gap in table:
        f = float(fraction.rstrip(" %")) / 100
        mine = df[df["fraction"] == f]
        assert int(rows) == int(mine["train_rows_total"].iloc[0])
        assert hard == f"{mine[mine['targets'] == 'hard']['test_accuracy'].mean():.4f}"
        assert soft == f"{mine[mine['targets'] == 'soft']['test_accuracy'].mean():.4f}"
        g = gaps.loc[f]
        assert gap.startswith("not measurable") if pd.isna(g["gap"]) else \
            gap == f"{100 * g['gap']:.1f} % +- {100 * g['gap_std']:.1f} %"


def test_the_readme_mnist_line_is_what_its_rows_give():
    import json

    import pandas as pd

    text = " ".join((ROOT / "README.md").read_text().split())
    line = text[text.index("The paper's own MNIST table"):].split("Rows and commands")[0]
    folder = ROOT / "docs" / "results"
    df = pd.read_csv(folder / "mnist_paper" / "results.csv")
    teacher = json.loads((folder / "mnist_paper" / "sweep.json").read_text())["teacher_test_accuracy"][0]
    errors = {t: df[df["targets"] == t]["test_errors"].mean() for t in ("hard", "soft")}
    assert f"teacher {round((1 - teacher) * 10000)} test errors" in line
    assert f"hard labels {errors['hard']:g}" in line and f"T = 20 {errors['soft']:g}" in line
    omit = (folder / "mnist_paper_omit3" / "console.log").read_text()
    keep = (folder / "mnist_paper_keep78" / "console.log").read_text()
    assert "test errors 280 (172 on those classes) -> 172 (45)" in omit and "makes 280 errors, 172 after" in line
    assert "test errors 3587 (3573 on those classes) -> 1304 (1027)" in keep and "only 35.9 %, 13.0 % after" in line


def _doc_table(doc: str, header_start: str) -> list[list[str]]:
    """The rows of the markdown table in ``doc`` whose header starts with ``header_start``."""
    lines = (ROOT / "docs" / doc).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _mean_std(df, **where) -> str:
    for k, v in where.items():
        df = df[df[k] == v]
    acc = df["test_accuracy"]
    return f"{acc.mean():.4f} +- {acc.std():.4f}"


def test_the_losses_tables_are_what_their_rows_give():
    """docs/losses.md: every cell of the digits table from results/digits_losses and
    digits_losses_logits; every accuracy of the Fashion-MNIST table from results/fashion_mnist_losses."""
    import pandas as pd

    folder = ROOT / "docs" / "results"
    probs = pd.read_csv(folder / "digits_losses" / "results.csv")
    logits = pd.read_csv(folder / "digits_losses_logits" / "results.csv")
    table = _doc_table("losses.md", "| fraction | hard | kd (probs)")
    assert len(table) == 4
    for fraction, hard, kd, per, kd_logits, dkd1, dkd8 in table:
        f = float(fraction.rstrip(" %")) / 100
        assert hard == _mean_std(probs, fraction=f, targets="hard")
        assert kd == _mean_std(probs, fraction=f, targets="soft", loss="kd")
        assert per == _mean_std(probs, fraction=f, loss="per_teacher")
        assert kd_logits == _mean_std(logits, fraction=f, targets="soft", loss="kd")
        assert dkd1 == _mean_std(probs, fraction=f, loss="dkd", loss_args='{"nckd": 1.0, "tckd": 1.0}')
        assert dkd8 == _mean_std(probs, fraction=f, loss="dkd", loss_args='{"nckd": 8.0, "tckd": 1.0}')
    fashion = pd.read_csv(folder / "fashion_mnist_losses" / "results.csv")
    for row in _doc_table("losses.md", "| fraction | hard | kd | per_teacher"):
        f = float(row[0].split(" %")[0]) / 100
        cells = [c.split(" ")[0] for c in row[1:]]
        want = [fashion[(fashion.fraction == f) & (fashion.targets == "hard")],
                *[fashion[(fashion.fraction == f) & (fashion.loss == loss) & (fashion.targets == "soft")
                          & (fashion.loss_args == args)] for loss, args in (
                    ("kd", "{}"), ("per_teacher", "{}"), ("dkd", '{"nckd": 1.0, "tckd": 1.0}'),
                    ("dkd", '{"nckd": 8.0, "tckd": 1.0}'))]]
        assert cells == [f"{w['test_accuracy'].mean():.4f}" for w in want]


def test_the_pretrained_table_is_what_its_rows_give():
    import json

    import pandas as pd

    from kd_ray.report import gap_recovered

    folder = ROOT / "docs" / "results"
    for row, name in zip(_doc_table("results.md", "| | ensemble test (val) | teachers' test accuracy"),
                         ("fashion_mnist_losses", "fashion_mnist_pretrained")):
        df = pd.read_csv(folder / name / "results.csv")
        df = df[(df["targets"] == "hard") | (df["loss"] == "kd")]
        info = json.loads((folder / name / "sweep.json").read_text())
        assert row[1] == f"{info['ensemble_test_accuracy']:.4f} ({info['ensemble_val_accuracy']:.4f})"
        each = info["teacher_test_accuracy"]
        assert row[2] == f"{min(each):.4f}-{max(each):.4f}"
        gaps = gap_recovered(df, info["ensemble_test_accuracy"], min_gap=5 / info["test_rows"]).set_index("fraction")
        for cell, f in zip(row[3:], (0.03, 0.1)):
            hard, soft = (df[(df.fraction == f) & (df.targets == t)]["test_accuracy"].mean() for t in ("hard", "soft"))
            g = gaps.loc[f]
            assert cell == f"{hard:.4f} / {soft:.4f} / {100 * g['gap']:.1f} % +- {100 * g['gap_std']:.1f} %"
