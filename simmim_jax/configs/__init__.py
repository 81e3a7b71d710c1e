"""The packaged config files, addressable by name as well as by path.

`--config=demo`, `--config=pretrain/vit_base_800ep` or `--config=finetune/demo` name a file of this folder
(`configs/NAME.py`, the spelling of older commands, names it too); any other value is a path to your own
config file, which wins when it exists. A config file is a Python module with `get_config()` returning an
ml-collections ConfigDict (ml-collections' convention; `config_flags` loads files the same way).

Configs come in families, one `get_config(arg)` each with variant arguments, as big_vision's: `pretrain`
("ENCODER,EPOCHS"), `finetune` ("ENCODER,IMG_SIZE,EPOCHS"), `linear_probe` ("ENCODER") are the folders'
`__init__.py`, `demo` takes "vit" or "swin". Every official recipe is a file naming its variant, whose
docstring cites its yaml; `--config=FAMILY:ARG` (or `--config=FILE:ARG`, config_flags' spelling) builds
any variant, e.g. `--config=pretrain:swin_large,100ep`.
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


def families() -> list[str]:
  """The packaged families whose `get_config(arg)` takes a variant: 'finetune', 'linear_probe', 'pretrain'."""
  return sorted(entry.name for entry in os.scandir(ROOT) if os.path.isfile(os.path.join(entry.path, "__init__.py")))


def split_variant(spec: str) -> tuple[str, str | None]:
  """('pretrain', 'vit_base,800ep') for 'pretrain:vit_base,800ep'; (spec, None) for an existing file or a
  spec without ':'."""
  if os.path.isfile(spec) or ":" not in spec:
    return spec, None
  config, arg = spec.split(":", 1)
  return config, arg


def resolve(spec: str) -> str:
  """The file `spec` names: an existing file, else a packaged config ('demo', 'configs/demo.py',
  'pretrain/vit_base_800ep') or family ('pretrain': its __init__.py); a ':ARG' suffix is left aside.
  FileNotFoundError names the closest packaged configs."""
  spec, _ = split_variant(spec)
  if os.path.isfile(spec):
    return spec
  name = spec[len("configs/"):] if spec.startswith("configs/") else spec
  name = name[:-3] if name.endswith(".py") else name
  name = name[:-len("/__init__")] if name.endswith("/__init__") else name.rstrip("/")
  if name in names():
    return os.path.join(ROOT, *name.split("/")) + ".py"
  if name in families():
    return os.path.join(ROOT, name, "__init__.py")
  close = difflib.get_close_matches(name, names(), n=3)
  hint = f"did you mean {' or '.join(close)}?" if close else f"packaged configs: {', '.join(names())}"
  raise FileNotFoundError(f"--config={spec}: no such file and no packaged config of that name ({hint})")


def load(spec: str) -> ml_collections.ConfigDict:
  """`get_config()` of the file `spec` names (see `resolve`), `get_config(ARG)` for 'NAME:ARG'."""
  path, (name, arg) = resolve(spec), split_variant(spec)
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
  if arg is None and os.path.basename(path) == "__init__.py" and os.path.dirname(path).startswith(ROOT):
    recipes = [n for n in names() if n.startswith(os.path.basename(os.path.dirname(path)) + "/")]
    family = (module.__doc__ or "").split("\n")[0]
    raise TypeError(f"a family of configs ({family}): name one of its recipes "
                    f"({', '.join(recipes)}) or a variant, --config={name}:ARG")
  config = module.get_config() if arg is None else module.get_config(arg)
  if not isinstance(config, ml_collections.ConfigDict):
    raise TypeError(f"--config={spec}: get_config() of {path} returned {type(config).__name__}, not a ConfigDict")
  return config
