"""The package's layers: imports run only downward (lazy imports inside functions included), and no tool or
reader of files imports a recipe. Layers, bottom first: the public modules (masking, losses), models and configs;
data; storage (workdir, checkpoints, weight files); train (the run core, then the recipes); tools; the CLI."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "simmim_jax"
LAYERS = {"masking": 0, "losses": 0, "configs": 0, "models": 1, "data": 2, "storage": 3, "train": 4, "tools": 5,
          "cli": 6, "main": 6}
RECIPES = ("simmim_jax.train.pretrain", "simmim_jax.train.finetune", "simmim_jax.train.linear_probe",
           "simmim_jax.train.downstream")
CORE = "simmim_jax.train.run"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
  """Every simmim_jax module `path` imports, at the top or inside a function."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names if alias.name.startswith("simmim_jax"))
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("simmim_jax"):
      found.update(f"{node.module}.{alias.name}" for alias in node.names)  # a name may be a module or not
  return found


def _layer(module: str) -> int | None:
  parts = module.split(".")
  return LAYERS.get(parts[1]) if len(parts) > 1 else None


MODULES = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
  assert {m for m in MODULES if m != "simmim_jax" and _layer(m) is None} == set()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_downward(module):
  if module == "simmim_jax":
    return
  upward = sorted(i for i in MODULES[module] if (_layer(i) or 0) > _layer(module))
  assert not upward, f"{module} imports a higher layer: {upward}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_tool_or_core_imports_a_recipe(module):
  if module.startswith(RECIPES) or _layer(module) == LAYERS["cli"]:
    return  # recipes use each other's shared parts (downstream); the CLI is the registry of recipes
  assert not [i for i in MODULES[module] if i.startswith(RECIPES)], f"{module} imports a recipe"


def test_the_core_imports_no_recipe():
  assert not [i for i in MODULES[CORE] if i.startswith(RECIPES)]
