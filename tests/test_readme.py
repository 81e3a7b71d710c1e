"""The README's two set-up commands are the ones CI and users run."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
  text = (ROOT / "README.md").read_text()
  quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```bash\n(.+?)\n```", quick_start)


def test_readme_has_exactly_two_setup_commands():
  commands = readme_commands()
  assert len(commands) == 2
  assert "simmim-pretrain --config=demo" in commands[0]
  assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
  ci = (ROOT / ".ci" / "run").read_text()
  readme_test = readme_commands()[1].replace("PYENV_VERSION=3.12 ", "")  # .ci/run exports it
  assert readme_test in ci.splitlines()
