"""Runs a Python snippet in a fresh interpreter in which every TensorFlow import fails."""

import subprocess
import sys
import textwrap

_BLOCKER = """
import importlib.abc, sys
class BlockTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "tf_keras", "keras"):
            raise ImportError("TensorFlow is blocked in this test: " + name)
sys.meta_path.insert(0, BlockTensorFlow())
"""
_CHECK = """
assert not any(n.startswith("tensorflow") for n in sys.modules), "TensorFlow was imported"
print("OK")
"""


def assert_runs_without_tensorflow(snippet: str, timeout: int = 300) -> None:
  script = _BLOCKER + textwrap.dedent(snippet) + _CHECK
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("OK")
