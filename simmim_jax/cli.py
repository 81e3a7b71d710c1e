"""Every command-line program of simmim_jax: its flags, its config, and one exit policy.

  simmim-pretrain, simmim-finetune, simmim-linear-probe   the recipes (pretrain.py, finetune.py, linear_probe.py)
  simmim-convert        PyTorch checkpoints <-> simmim_jax (convert.py)
  simmim-reconstruct    the SimMIM reconstruction of any image (reconstruct.py)
  simmim-aot            ahead-of-time compilation of a pretraining config for a target mesh (aot.py)

`python -m simmim_jax.cli PROGRAM [flags]` runs any of them without the console scripts (PROGRAM: pretrain,
finetune, linear-probe, convert, reconstruct, aot); `python -m simmim_jax.main` is simmim-pretrain.

Each program defines its absl flags on its own `flags.FlagValues` when it starts (importing this module
defines nothing, so programs never share a flag, even in one process), reads `--config` with ml-collections'
`config_flags` (`--config.key=value` overrides a field; the config is locked, so a mistyped key is an error)
and returns its exit status: bad input or config 2, with one line naming the value and the fix; a run that
stopped (data, non-finite values, a failed write) 1, with the reason; preempted after saving 143. Anything
else is a bug and keeps its traceback. `--help` prints the program's usage (its docstring) and its flags.
(`absl.app.run` is not used: its --help exits 1 with `__main__`'s docstring, and it always exits, so a test
cannot call a program and read its status.)
"""

import faulthandler
import importlib
import inspect
import json
import os
import pickle
import re
import sys
import zipfile

from absl import flags, logging
from ml_collections import config_flags

from simmim_jax import host_memory  # imports nothing that starts a thread

EXIT_BAD_INPUT, EXIT_FAILURE = 2, 1
_HELP = {"--help", "-h", "--helpshort", "--helpfull"}


class _Refused(Exception):
  """Bad input found by the command line itself; the message is the whole line after the program name."""


# ----------------------------------------------------------------------------------------------------
# The programs


def pretrain_main(argv=None) -> int:
  """simmim-pretrain: SimMIM pretraining; rerunning the same command resumes from the last checkpoint.

    simmim-pretrain --config=configs/demo.py --workdir=workdir/demo
    simmim-pretrain --config=configs/pretrain/vit_base_800ep.py --workdir=gs://BUCKET/vit_b \\
        --config.global_batch_size=2048
  """
  return _train("pretrain", "simmim-pretrain", pretrain_main, argv)


def finetune_main(argv=None) -> int:
  """simmim-finetune: fine-tuning of a pretrained encoder (a simmim-pretrain or simmim-convert workdir).

    simmim-finetune --config=configs/finetune/demo.py --workdir=workdir/demo_ft --config.pretrained=workdir/demo
  """
  return _train("finetune", "simmim-finetune", finetune_main, argv)


def linear_probe_main(argv=None) -> int:
  """simmim-linear-probe: linear probing of a frozen pretrained encoder.

    simmim-linear-probe --config=configs/linear_probe/demo.py --workdir=workdir/demo_probe \\
        --config.pretrained=workdir/demo
  """
  return _train("linear_probe", "simmim-linear-probe", linear_probe_main, argv)


def convert_main(argv=None) -> int:
  """simmim-convert: official SimMIM / Hugging Face PyTorch weights <-> simmim_jax.

    simmim-convert --checkpoint=simmim_pretrain__swin_base__img192_window6__800ep.pth \\
        --encoder=swin_base_patch4_window6 --workdir=workdir/swin_b_800ep
    simmim-convert --checkpoint=workdir/swin_b_800ep --export --out=model.safetensors
  """
  # A refused or unreadable weight file (torch_files.WeightFileError is a ValueError) or bad arguments.
  bad_input = (ValueError, FileNotFoundError, FileExistsError, pickle.UnpicklingError, zipfile.BadZipFile)
  return _run("simmim-convert", convert_main, argv, _convert_flags, _convert, bad_input=bad_input)


def reconstruct_main(argv=None) -> int:
  """simmim-reconstruct: the SimMIM reconstruction of any image, from a converted or a trained model.

    simmim-reconstruct --checkpoint=workdir/swin_b_800ep --image=photo.jpg --out=grid.png
    simmim-reconstruct --checkpoint=simmim_pretrain.pth --encoder=vit_base_patch16 --image=photo.jpg --out=grid.png
  """
  return _run("simmim-reconstruct", reconstruct_main, argv, _reconstruct_flags, _reconstruct,
              bad_input=(ValueError, FileNotFoundError), failures=(OSError,))


def aot_main(argv=None) -> int:
  """simmim-aot: compiles the real pretraining step for a mesh and prints its memory per device.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 simmim-aot \\
        --config=configs/pretrain/swin_large_800ep.py --config.global_batch_size=64 --config.mesh.fsdp=8
  """
  return _run("simmim-aot", aot_main, argv, _aot_flags, _aot)


# ----------------------------------------------------------------------------------------------------
# Training: simmim-pretrain, simmim-finetune, simmim-linear-probe


def _train(recipe: str, program: str, entry, argv) -> int:
  _prepare_process()
  return _run(program, entry, argv, _train_flags, lambda values: _train_recipe(recipe, values))


def _prepare_process():
  """Process-wide settings that must precede every thread: the host allocator of CPU-only runs
  (simmim_jax/host_memory.py; JAX, TensorFlow and their thread pools are imported after this)."""
  host_memory.configure_for_cpu_only()


def _train_flags(values: flags.FlagValues, argv: list[str]) -> None:
  _config_flag(values, argv, "the recipe's config file", required=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images; rerunning with the same "
                      "workdir resumes.", required=True, flag_values=values)
  # Multi-process runs: Cloud TPU VM slices, SLURM and Open MPI are detected; elsewhere pass all three.
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (jax.distributed).", flag_values=values)
  flags.DEFINE_integer("num_processes", None, "Number of processes (jax.distributed).", flag_values=values)
  flags.DEFINE_integer("process_id", None, "This process's index (jax.distributed).", flag_values=values)


def _train_recipe(recipe: str, values: flags.FlagValues) -> None:
  faulthandler.enable()  # a hard crash (in XLA, say) still prints the Python stack
  logging.set_verbosity(logging.INFO)
  _start_distributed(values)
  module = importlib.import_module(f"simmim_jax.{recipe}")  # after flag parsing, so --help stays fast
  module.train_and_evaluate(_load_config(values), values.workdir)


def _start_distributed(values: flags.FlagValues) -> None:
  """jax.distributed, before any backend starts."""
  from simmim_jax import distributed  # pylint: disable=g-import-not-at-top

  try:
    distributed.initialize(values.coordinator_address, values.num_processes, values.process_id)
  except ValueError as e:
    raise _Refused(f"configuration error: {_one_line(e)}") from None


# ----------------------------------------------------------------------------------------------------
# simmim-convert


def _convert_flags(values: flags.FlagValues, argv: list[str]) -> None:
  define = dict(flag_values=values)
  flags.DEFINE_string("checkpoint", None, ".pth / .bin / .safetensors / .npz state dict (with --export: a "
                      "simmim-pretrain workdir)", required=True, **define)
  flags.DEFINE_string("encoder", None, "(required unless --export or --config) registry name, e.g. "
                      "vit_base_patch16, swin_base_patch4_window6, swinv2_base_patch4_window12, "
                      "vit_base_patch16_plain", **define)
  flags.DEFINE_multi_string("override", [], "FIELD=VALUE encoder field override (a Python / JSON literal), e.g. "
                            "img_size=192 (repeatable)", **define)
  flags.DEFINE_string("workdir", None, "write a simmim-pretrain workdir (SimMIM checkpoints)", **define)
  _config_flag(values, argv, "a pretraining config file (optional): its model (name, fields, img_size) is the "
               "encoder, and with --workdir `simmim-pretrain --config=<it>` continues from the weights",
               required=False)
  flags.DEFINE_string("out", None, "write the converted Flax params (.npz, '/'-joined paths) or, with --export, "
                      "the official-format state dict (.safetensors or .npz)", **define)
  flags.DEFINE_bool("export", False, "read a simmim-pretrain workdir given as --checkpoint and write its "
                    "official-format PyTorch state dict to --out", **define)


def _convert(values: flags.FlagValues) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  from simmim_jax import convert, models, torch_files  # pylint: disable=g-import-not-at-top
  from simmim_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  if values.export:
    if not values.out:
      raise ValueError("--export needs --out=FILE.safetensors (or .npz)")
    model, variables, _ = workdir_lib.load_model(values.checkpoint)  # read-only
    _write_arrays(values.out, convert.to_torch(model, variables))
    print(f"wrote the official-format state dict of {values.checkpoint} to {values.out}")
    return
  config = _load_config(values) if values["config"].present else None
  encoder = values.encoder
  overrides = dict(_parse_override(o) for o in values.override)
  if config is not None:  # the config's encoder (name, fields, img_size); --encoder / --override win
    encoder = encoder or config.model.name
    overrides = {**models.field_overrides(config.model), "img_size": config.img_size, **overrides}
  if not encoder:
    raise ValueError("--encoder=NAME is required (models.list_encoders(): e.g. vit_base_patch16)")
  if not (values.workdir or values.out):
    raise ValueError("give --workdir=DIR (a simmim-pretrain workdir) and/or --out=FILE.npz")
  state_dict = torch_files.load_state_dict(values.checkpoint)
  fmt = convert.to_official_keys(state_dict)[1]
  model, variables = convert.from_torch(state_dict, encoder=encoder, **overrides)
  print(f"{values.checkpoint}: {fmt} format, {type(model).__name__} with {encoder} encoder, "
        f"{sum(np.size(v) for v in jax.tree.leaves(variables)):,} parameters")
  if values.out:
    _write_arrays(values.out, traverse_util.flatten_dict(variables["params"], sep="/"))
    print(f"wrote {values.out}")
  if values.workdir:
    convert.save_workdir(values.workdir, model, variables, encoder=encoder,
                         overrides={**convert.layout_overrides(state_dict, encoder), **overrides}, config=config,
                         source=os.path.abspath(values.checkpoint))
    print(f"wrote the simmim-pretrain workdir {values.workdir}")


def _parse_override(text: str):
  """'img_size=192' -> ("img_size", 192); a JSON literal ('(8, 8)' reads as a tuple), else the string."""
  key, _, raw = text.partition("=")
  if not key or not raw:
    raise ValueError(f"--override expects FIELD=VALUE (a Python / JSON literal); got {text!r}")
  try:
    value = json.loads(raw.replace("(", "[").replace(")", "]"))
  except json.JSONDecodeError:
    value = raw
  return key, tuple(value) if isinstance(value, list) else value


def _write_arrays(path: str, arrays: dict) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top

  from simmim_jax import torch_files  # pylint: disable=g-import-not-at-top

  if not path.endswith((".safetensors", ".npz")):
    raise ValueError(f"--out={path}: use a .npz or .safetensors file name")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  if path.endswith(".safetensors"):
    torch_files.write_safetensors(path, arrays)
  else:
    np.savez(path, **arrays)


# ----------------------------------------------------------------------------------------------------
# simmim-reconstruct


def _reconstruct_flags(values: flags.FlagValues, argv: list[str]) -> None:
  del argv
  define = dict(flag_values=values)
  flags.DEFINE_string("checkpoint", None, "a simmim-pretrain / simmim-convert workdir, or a PyTorch SimMIM "
                      "checkpoint file (with --encoder)", required=True, **define)
  flags.DEFINE_string("image", None, "any image pillow reads (JPEG, PNG, ...)", required=True, **define)
  flags.DEFINE_string("out", None, "the PNG to write", required=True, **define)
  flags.DEFINE_string("encoder", None, "registry name, for a checkpoint file", **define)
  flags.DEFINE_integer("img_size", None, "encoder input size override, for a checkpoint file", **define)
  flags.DEFINE_float("mask_ratio", 0.6, "fraction of mask patches masked", **define)
  flags.DEFINE_integer("mask_patch_size", None, "default: the run's (32 for checkpoint files)", **define)
  flags.DEFINE_integer("seed", 0, "seed of the random mask", **define)
  flags.DEFINE_integer("scale", 0, "PNG upscaling (default: to at least 256 px)", **define)


def _reconstruct(values: flags.FlagValues) -> None:
  from simmim_jax import reconstruct, visualize  # pylint: disable=g-import-not-at-top

  overrides = {"img_size": values.img_size} if values.img_size else {}
  model, variables, mask_patch_size = reconstruct.load_simmim(values.checkpoint, values.encoder, **overrides)
  image = reconstruct.load_image(values.image, model.encoder.img_size)
  grid = reconstruct.reconstruct(model, variables, image, mask_patch_size=values.mask_patch_size or mask_patch_size,
                                 mask_ratio=values.mask_ratio, seed=values.seed)
  visualize.save_png(grid, values.out, scale=values.scale or max(1, 256 // model.encoder.img_size))
  print(f"wrote {values.out}: original | masked | prediction | prediction pasted into the visible pixels")


# ----------------------------------------------------------------------------------------------------
# simmim-aot


def _aot_flags(values: flags.FlagValues, argv: list[str]) -> None:
  _config_flag(values, argv, "a pretraining config file", required=True)


def _aot(values: flags.FlagValues) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  from simmim_jax import aot, pretrain, sharding  # pylint: disable=g-import-not-at-top

  config = _load_config(values)
  pretrain.validate_config(config, "", check_data=False)
  compiled = aot.compile_step(pretrain.build_step(config, sharding.create_mesh(config.mesh)))
  print(f"compiled the {config.model.name} train step for {jax.device_count()} devices "
        f"(mesh data={config.mesh.data} fsdp={config.mesh.fsdp}); per-device bytes: {aot.memory_summary(compiled)}")


# ----------------------------------------------------------------------------------------------------
# What every program shares: flags, --help, config loading, the exit policy


def _run(program: str, entry, argv, define, body, *, bad_input=(), failures=()) -> int:
  """Defines the program's flags (`define(values, argv)`), answers --help, parses `argv` (default
  sys.argv[1:]) and runs `body(values)` under the exit policy; returns the exit status."""
  argv = [program, *(sys.argv[1:] if argv is None else argv)]
  values = flags.FlagValues()
  define(values, argv)
  if _HELP & set(argv[1:]):
    print(f"{inspect.getdoc(entry)}\n\nflags:\n{_flags_help(values)}")
    return 0
  try:
    rest = _parse_flags(values, argv)
    if rest[1:]:
      raise _Refused(f"unexpected argument {rest[1]!r}: every option is a --flag=value (see {program} --help)")
  except _Refused as e:
    return _refuse(program, str(e))
  flags.FLAGS.mark_as_parsed()  # absl logging's own flags keep their defaults (as under absl.app.run)
  logging.use_absl_handler()
  return run_program(program, lambda: body(values), bad_input=bad_input, failures=failures)


def _config_flag(values: flags.FlagValues, argv: list[str], what: str, *, required: bool) -> None:
  """--config=FILE (ml-collections, locked) and its --config.key=value overrides."""
  config_flags.DEFINE_config_file("config", None, f"{what}; --config.KEY=VALUE overrides any of its fields",
                                  flag_values=values, lock_config=True, sys_argv=argv)
  if required:
    flags.mark_flag_as_required("config", flag_values=values)


def _flags_help(values: flags.FlagValues) -> str:
  lines = values.get_help(include_special_flags=False).splitlines()
  return "\n".join(line for line in lines if line.startswith(" "))  # without absl's per-module headings


def _parse_flags(values: flags.FlagValues, argv: list[str]) -> list[str]:
  """absl's flag parsing; a flag or config override it refuses is one line (`_Refused`), not a traceback."""
  try:
    return values(argv)
  except flags.Error as e:
    raise _Refused(f"configuration error: {_last_line(e)} (see {argv[0]} --help)") from None
  except (AttributeError, KeyError) as e:  # ml-collections: an override naming no field of the locked config
    raise _Refused(f"configuration error: {unknown_key_message(e, argv)}") from None
  except (OSError, SyntaxError, ImportError) as e:  # the config file itself
    raise _Refused(f"configuration error: cannot load --config: {_last_line(e)}") from None


def unknown_key_message(error: Exception, argv: list[str]) -> str:
  """'unknown config key --config.a.b (did you mean --config.a.c?)' from ml-collections' KeyError /
  AttributeError, naming only the offending override and the closest valid key when there is one."""
  text = str(error.args[0]) if error.args else str(error)
  first, _, rest = text.replace("\\n", "\n").partition("\n")  # ml-collections nests reprs: \\n or \n
  key = first.replace("\\", "").strip().strip("\"'")
  overrides = [a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  offending = next((o for o in overrides if o.split(".")[-1] == key), f"config.{key}")
  message = f"unknown config key --{offending}"
  suggestion = re.search(r'Did you mean "([^"]+)"', rest)
  if suggestion:
    message += f" (did you mean --{offending.rsplit('.', 1)[0]}.{suggestion.group(1)}?)"
  return message + ": every --config.KEY must be a field of the config file"


def _load_config(values: flags.FlagValues):
  """The --config file with its overrides; a file that failed to load (ml-collections defers the error to
  the first use) is refused in one line."""
  try:
    config = values.config
    config.keys()
    return config
  except (OSError, SyntaxError, AttributeError) as e:
    raise _Refused(f"configuration error: cannot load --config: {_last_line(e)}") from None


def run_program(program: str, body, *, bad_input=(), failures=()) -> int:
  """Runs `body()` and turns the errors a user can act on into one line and the exit status: a config or
  input the program refuses -> 2 (ConfigError, a busy workdir, and the program's `bad_input` types); a run
  that stopped (data, non-finite values, a failed write, the program's `failures`) -> 1; preempted after
  saving -> 143. Anything else is a bug: its traceback is kept."""
  try:
    body()
    return 0
  except _Refused as e:
    return _refuse(program, str(e))
  except Exception as e:  # pylint: disable=broad-except  (classified below; anything else is re-raised)
    # Imported only now: a program that fails imports what classifies its error, and nothing more.
    from simmim_jax import checkpoint, data, run, validation  # pylint: disable=g-import-not-at-top
    from simmim_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

    if isinstance(e, (validation.ConfigError, workdir_lib.WorkdirBusyError)):
      return _refuse(program, f"configuration error: {_one_line(e)}")
    if isinstance(e, bad_input):
      return _refuse(program, _one_line(e))
    if isinstance(e, run.Preempted):
      print(f"{program}: {e}", flush=True)
      return run.PREEMPTED_EXIT_CODE
    if isinstance(e, (run.NonFiniteError, FloatingPointError, checkpoint.CheckpointWriteError, data.DataError,
                      *failures)):
      print(f"{program}: stopped: {_one_line(e)}", file=sys.stderr, flush=True)
      return EXIT_FAILURE
    raise


def _refuse(program: str, message: str) -> int:
  print(f"{program}: {message}", file=sys.stderr, flush=True)
  return EXIT_BAD_INPUT


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split())


def _last_line(error: BaseException) -> str:
  """The reason in a message that may carry a traceback or a list of attempts (ml-collections, absl)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if len(lines) > 1 and lines[0].startswith("flag --"):  # absl: 'flag --x=v: <parser message>'
    return f"{lines[0]} {lines[-1]}"
  return lines[-1] if lines else type(error).__name__


PROGRAMS = {"pretrain": pretrain_main, "finetune": finetune_main, "linear-probe": linear_probe_main,
            "convert": convert_main, "reconstruct": reconstruct_main, "aot": aot_main}


def main(argv=None) -> int:
  """python -m simmim_jax.cli PROGRAM [flags]."""
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] not in PROGRAMS:
    print(f"usage: python -m simmim_jax.cli {{{','.join(PROGRAMS)}}} [flags] (PROGRAM --help for its flags)",
          file=sys.stderr)
    return 2
  return PROGRAMS[argv[0]](argv[1:])


if __name__ == "__main__":
  sys.exit(main())
