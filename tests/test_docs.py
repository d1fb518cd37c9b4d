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
