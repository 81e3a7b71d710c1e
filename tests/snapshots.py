"""A folder as data: every path under it with its bytes (folders as None), to assert a folder is unchanged."""

import os
import pathlib


def snapshot(root) -> dict[str, bytes | None]:
  root = pathlib.Path(root)
  if not root.exists():
    return {}
  result = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs:
      result[os.path.relpath(os.path.join(folder, name), root)] = None
    for name in files:
      path = os.path.join(folder, name)
      result[os.path.relpath(path, root)] = pathlib.Path(path).read_bytes()
  return result
