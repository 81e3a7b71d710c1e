"""The test suite's own layout: shared helpers live in tests/helpers.py, and no test module imports another
(lazy imports inside functions included), so each module runs alone and a helper has one home."""

import ast
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent
TEST_MODULES = {path.stem for path in TESTS.glob("test_*.py")}


def imported_modules(path: pathlib.Path) -> set[str]:
  """The top-level names of the modules `path` imports, at the top or inside a function."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      found.add(node.module)
  return found


def test_no_test_module_imports_another():
  offenders = {}
  for path in sorted(TESTS.glob("*.py")):
    imported = {name.removeprefix("tests.").split(".")[0] for name in imported_modules(path)}
    if imported & TEST_MODULES:
      offenders[path.name] = sorted(imported & TEST_MODULES)
  assert not offenders, f"move what they share to tests/helpers.py: {offenders}"


def test_the_check_sees_an_import_of_a_test_module_at_the_top_and_inside_a_function(tmp_path):
  path = tmp_path / "test_example.py"
  path.write_text("from tests.test_cli import x\n\ndef f():\n  import test_run\n  from helpers import ROOT\n")
  assert imported_modules(path) == {"tests.test_cli", "test_run", "helpers"}
