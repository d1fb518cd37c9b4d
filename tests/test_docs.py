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
    longer = json.loads((folder / "mnist_paper_250" / "sweep.json").read_text())["teacher_test_accuracy"][0]
    assert f"250 teacher epochs gave {round((1 - longer) * 10000)} errors" in line
    plain = json.loads(next(ln for ln in (folder / "mnist_paper_plain" / "console.log").read_text().splitlines()
                            if ln.startswith('{"teacher_test_errors"')))
    mean = {t: sum(r["test_errors"] for r in plain[t]) / len(plain[t]) for t in ("hard", "soft")}
    assert f"same recipe: {plain['teacher_test_errors']} / {mean['hard']:g} / {mean['soft']:g} errors" in line


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


# Every markdown table in the README and docs/ stands under a line naming the committed rows it
# comes from: `<!-- rows: results/<folder>[, results/<folder or file>] -->` (paths under docs/), or
# `<!-- rows: none -->` for what holds no measured figure (a config list, a layout). The line backs
# every table and paragraph below it, up to the next heading or rows line.
ROWS = re.compile(r"^\s*<!-- rows: (.+) -->$")
FIGURE = re.compile(r"(?<![\w.])(\d+\.\d+(?:e-?\d+)?)(?![\d.])")  # 0.9846, 0.69 (x), 55.3 (s), 92.1 (%): not 3 or 1,204
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")
GRID = ("fraction", "targets", "teaching", "temperature", "alpha", "lr", "epochs", "loss", "loss_args", "mixup",
        "views")
SCORES = ("test_accuracy", "val_accuracy", "test_fidelity", "test_errors", "val_errors", "train_seconds")


def _ensemble(folder: Path) -> float | None:
    """A run's ensemble test accuracy: sweep.json, or summary.md for runs older than it."""
    import json

    if (folder / "sweep.json").is_file():
        return json.loads((folder / "sweep.json").read_text()).get("ensemble_test_accuracy")
    summary = folder / "summary.md"
    m = summary.is_file() and re.search(r"Ensemble of \d+ teachers: ([\d.]+)", summary.read_text())
    return float(m.group(1)) if m else None


def _row_values(paths: list[Path]) -> set[float]:
    """Every number committed rows give: each number in their text files; the ratios of two numbers
    of one benchmark's JSON line; for each results.csv the mean and std over seeds of every score
    per setting and the summed training and wall seconds per teaching mode; and, per fraction, the gap recovered (soft - hard) / (ensemble - hard) of each
    setting's mean and each seed's score against each cited run's hard mean (or the same seed's
    hard score), and the accuracy the issues' targets need (87 % or 90 % of the gap). A table may
    print any of them as a percentage, without its sign, errors per 10,000 as a percentage, or
    seconds as minutes."""
    import pandas as pd

    values: set[float] = set()
    soft, hard, ensembles = [], [], set()  # (fraction, seed or None for the mean, accuracy); ensembles
    for path in paths:
        for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            if f.suffix in (".csv", ".json", ".jsonl", ".md", ".log", ".txt", ".yaml"):
                text = f.read_text(errors="replace")
                values.update(float(m) for m in NUMBER.findall(text))
                for line in (ln for ln in text.splitlines() if ln.startswith('{"benchmark"')):
                    nums = [float(m) for m in NUMBER.findall(line)]
                    values.update(a / b for a in nums for b in nums if b)
            if f.name != "results.csv":
                continue
            df = pd.read_csv(f)
            for c in (c for c in ("train_seconds", "wall_s") if c in df):  # summed time per mode
                values.update(df.groupby([c for c in ("targets", "teaching") if c in df])[c].sum())
            grid = [c for c in GRID if c in df.columns]
            for _, g in df.astype({c: str for c in grid}).groupby(grid):
                for c in (c for c in SCORES if c in g):
                    values.update((g[c].mean(), g[c].std()) if len(g) > 1 else (g[c].mean(),))
                rows = hard if g["targets"].iloc[0] == "hard" else soft
                rows.append((float(g["fraction"].iloc[0]), None, g["test_accuracy"].mean()))
                rows.extend((float(r.fraction), r.seed, r.test_accuracy) for r in g.itertuples())
            if (ensemble := _ensemble(f.parent)) is not None:
                ensembles.add(ensemble)
    for e in ensembles:
        for fh, sh, h in hard:
            values.update((h + 0.87 * (e - h), h + 0.9 * (e - h)))
            values.update((a - h) / (e - h) for fs, ss, a in soft if fs == fh and sh in (None, ss) and e != h)
    return {w for v in values if v == v for w in (v, 100 * v, abs(v), v / 100, v / 60)}


def _given(figure: str, values: set[float]) -> bool:
    """A printed figure is one of ``values`` rounded to the figure's decimals."""
    mantissa, _, exponent = figure.partition("e")
    decimals = len(mantissa.partition(".")[2])
    if exponent:  # 1.3e-8: compared in the same notation
        return any(f"{v:.{decimals}e}" == f"{float(figure):.{decimals}e}" for v in values)
    return any(f"{v:.{decimals}f}" == figure for v in values)


FOLDER = re.compile(r"(?<![\w/])(?:docs/)?(results/[\w.-]*[\w])")  # a results folder or file a paragraph names
BULLET = re.compile(r"^\s*(?:[-*]|\d+\.) ")
VALUE_TO_FILL = re.compile(r"<[A-Za-z][^<>=\n]*>")  # <mnist root> in prose; not "<= 80 ... ->"


def _prose(text: str) -> str:
    """Text without inline code and placeholders, thousands separators dropped (10,373 is one number)."""
    return re.sub(r"(?<=\d),(?=\d{3})", "", VALUE_TO_FILL.sub("", SPAN.sub("", text)))


def doc_blocks() -> list[tuple[str, str, int, str | None, str]]:
    """(kind, doc, line number, the text of the rows line it falls under or None, its text) for
    every table and prose paragraph (each bullet is one) of the docs; headings, rows lines and code
    (fenced, or indented four spaces after a blank line) are neither."""
    out = []
    for path in DOCS:
        marker, block, kind, start, fence, code, after_blank = None, [], "", 0, False, False, True

        def close():
            if block:
                out.append((kind, path.name, start, marker, "\n".join(block)))
                block.clear()

        for i, line in enumerate(path.read_text().splitlines()):
            blank = not line.strip()
            if line.startswith("```"):
                fence, after_blank = not fence, False
                close()
                continue
            if fence or (code and (blank or line.startswith("    "))):
                after_blank = blank
                continue
            code = line.startswith("    ") and after_blank
            after_blank = blank
            rows = ROWS.match(line)
            line_kind = "table" if line.lstrip().startswith("|") else "prose"
            heading = re.match(r"#{1,6} ", line)
            if code or blank or heading or rows or BULLET.match(line) or line_kind != kind:
                close()
            if heading:
                marker = None
            elif rows:
                marker = rows.group(1)
            elif not (code or blank):
                kind, start = line_kind, start if block else i + 1
                block.append(line)
        close()
    return out


def doc_tables() -> list[tuple[str, int, str | None, str]]:
    return [(doc, line, marker, text) for kind, doc, line, marker, text in doc_blocks() if kind == "table"]


def _figures_off(text: str, values: set[float]) -> list[str]:
    """The figures of a paragraph (or of one table row) that ``values`` do not give, nor a
    difference, ratio or mean of two numbers it prints that ``values`` give (as a percentage,
    unsigned)."""
    text = _prose(text)
    shown = {float(n) for n in NUMBER.findall(text) if _given(n, values)}
    derived = {v for a in shown for b in shown for v in (a - b, (a + b) / 2, a / b if b else a)}
    derived = {w for v in derived for w in (v, 100 * v, abs(v), 100 * abs(v))}
    return [f for f in FIGURE.findall(text) if not _given(f, values) and not _given(f, derived)]


def test_the_table_check_finds_a_figure_its_rows_do_not_give():
    # the README's default-run table: its 3 % soft accuracy and gap are given; the same accuracy
    # with its last digit off is not (but for a rare coincidence with another number of the rows)
    values = _row_values([ROOT / "docs" / "results" / "digits_default"])
    soft, gap = _readme_table("The default run (`kd-ray run`, digits")[0][3:5]
    assert _given(soft, values) and _given(gap.split(" %")[0], values)
    off_by = [f"{float(soft) + d / 10000:.4f}" for d in (-3, -2, -1, 1, 2, 3)]
    assert sum(_given(x, values) for x in off_by) <= 1, [x for x in off_by if _given(x, values)]


def test_every_docs_table_names_its_rows_and_gives_what_they_give():
    tables = doc_tables()
    assert len(tables) > 50  # guards the parser: the docs hold ~60 tables
    unmarked = [f"{doc}:{line}" for doc, line, marker, _ in tables if marker is None]
    assert not unmarked, f"tables under no `<!-- rows: ... -->` line: {unmarked}"
    wrong = []
    for doc, line, marker, table in tables:
        figures = FIGURE.findall(table)
        if marker.startswith("none"):
            if figures:
                wrong.append(f"{doc}:{line} says rows: none but holds figures {figures[:3]}")
            continue
        paths = [ROOT / "docs" / p.strip() for p in marker.split(",")]
        if missing := [str(p.relative_to(ROOT)) for p in paths if not p.exists()]:
            wrong.append(f"{doc}:{line} names rows that are not committed: {missing}")
            continue
        values = _row_values(paths)
        if off := [x for row in table.splitlines() for x in _figures_off(row, values)]:
            wrong.append(f"{doc}:{line}: {off[:6]} not given by {marker}")
    assert not wrong, "\n".join(wrong)


def test_the_paragraph_check_finds_a_figure_its_rows_do_not_give():
    values = _row_values([ROOT / "docs" / "results" / "mnist_paper"])  # hard 151.5, soft 121 errors (means)
    assert not _figures_off("this one is 30.5 (151.5 -> 121), `--set student.lr=0.123`", values)
    assert _figures_off("this one is 30.4 (151.5 -> 121)", values) == ["30.4"]
    assert _figures_off("this one is 30.5 (151.6 -> 121)", values) == ["30.5", "151.6"]


def test_every_docs_paragraph_gives_what_its_rows_give():
    """Prose as tables: a paragraph is backed by the rows line above it (up to the next heading)
    and by the results folders it names; each decimal figure in it must be given by those rows or
    be a difference, ratio or mean of two numbers it prints that they give. A paragraph whose figures are
    not measured (a version, a setting, an estimate) stands under `<!-- rows: none -->`; inline code
    (commands, config values) is not checked."""
    cache: dict[tuple[str, ...], set[float]] = {}
    unbacked, wrong, checked = [], [], 0
    for doc, line, marker, text in (b[1:] for b in doc_blocks() if b[0] == "prose"):
        figures = FIGURE.findall(_prose(text))
        if not figures or (marker or "").startswith("none"):
            continue
        rows = [p.strip() for p in (marker or "").split(",") if p.strip()]
        rows += [f for f in FOLDER.findall(text) if (ROOT / "docs" / f).exists()]
        if not rows:
            unbacked.append(f"{doc}:{line} {figures[:4]}")
            continue
        key = tuple(sorted(set(rows)))
        if key not in cache:
            cache[key] = _row_values([ROOT / "docs" / p for p in key])
        checked += len(figures)
        if off := _figures_off(text, cache[key]):
            wrong.append(f"{doc}:{line}: {off[:6]} not given by {', '.join(key)}")
    assert checked > 500  # guards the parser: the docs' prose holds ~800 figures
    assert not unbacked, f"paragraphs with figures and no rows line or results folder: {unbacked}"
    assert not wrong, "\n".join(wrong)
