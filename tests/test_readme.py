"""README.md and CI agree: ``.ci/run`` runs the README's set-up and test commands and its documentation build.

The README's Python blocks run in ``tests/test_snippets.py`` (with the Quickstart's results checked there).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bash_commands(text: str) -> list[str]:
    """The ``&&``-separated commands of the ```bash blocks of a Markdown text and its inline code spans."""
    spans = re.findall(r"```bash\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text)
    return [command.strip() for span in spans for line in span.splitlines() for command in line.split("&&")]


def test_ci_runs_the_readme_commands():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    commands = bash_commands(readme)
    ci_lines = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    for command in ('pip install -e ".[dev]"', "python -m pytest -q", 'pip install -e ".[docs]"',
                    "mkdocs build --strict"):
        assert command in commands, f"README no longer says {command!r}"
        assert command in ci_lines, f".ci/run does not run README's {command!r}"
