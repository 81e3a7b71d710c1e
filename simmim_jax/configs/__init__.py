"""The packaged config files, addressable by name as well as by path.

`--config=demo`, `--config=pretrain/vit_base_800ep` or `--config=finetune/demo` name a file of this folder
(`configs/NAME.py`, the spelling of older commands, names it too); any other value is a path to your own
config file, which wins when it exists. A config file is a Python module with `get_config()` returning an
ml-collections ConfigDict (ml-collections' convention; `config_flags` loads files the same way).
"""

import difflib
import importlib.util
import os
import sys

import ml_collections

ROOT = os.path.dirname(os.path.abspath(__file__))
# Modules that build configs but are not runs of their own: the defaults every recipe starts from.
BUILDING_BLOCKS = ("default_config", "finetune_config")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key, the value and the fix (exit 2)."""


def names() -> list[str]:
  """Every packaged config: 'demo', 'pretrain/vit_base_800ep', ... (sorted)."""
  found = []
  for folder, _, files in os.walk(ROOT):
    for file in files:
      if file.endswith(".py") and file != "__init__.py" and file[:-3] not in BUILDING_BLOCKS:
        found.append(os.path.relpath(os.path.join(folder, file), ROOT)[:-3].replace(os.sep, "/"))
  return sorted(found)


def resolve(spec: str) -> str:
  """The file `spec` names: an existing file, else a packaged config ('demo', 'configs/demo.py',
  'pretrain/vit_base_800ep'). FileNotFoundError names the closest packaged configs."""
  if os.path.isfile(spec):
    return spec
  name = spec[len("configs/"):] if spec.startswith("configs/") else spec
  name = name[:-3] if name.endswith(".py") else name
  if name in names():
    return os.path.join(ROOT, *name.split("/")) + ".py"
  close = difflib.get_close_matches(name, names(), n=3)
  hint = f"did you mean {' or '.join(close)}?" if close else f"packaged configs: {', '.join(names())}"
  raise FileNotFoundError(f"--config={spec}: no such file and no packaged config of that name ({hint})")


def load(spec: str) -> ml_collections.ConfigDict:
  """`get_config()` of the file `spec` names (see `resolve`)."""
  path = resolve(spec)
  module_name = f"_simmim_config_{abs(hash(os.path.abspath(path)))}"
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  if module_spec is None or module_spec.loader is None:
    raise ImportError(f"--config={spec}: {path} is not a Python file")
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[module_name] = module  # dataclasses and pickling inside a config need the module registered
  try:
    module_spec.loader.exec_module(module)
  finally:
    del sys.modules[module_name]
  if not callable(getattr(module, "get_config", None)):
    raise ImportError(f"--config={spec}: {path} defines no get_config()")
  config = module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise TypeError(f"--config={spec}: get_config() of {path} returned {type(config).__name__}, not a ConfigDict")
  return config
