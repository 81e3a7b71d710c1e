"""Every command-line program of simmim_jax: its flags, its config, and one exit policy.

  simmim-pretrain, simmim-finetune, simmim-linear-probe   the recipes (pretrain.py, finetune.py, linear_probe.py)
  simmim-convert        PyTorch checkpoints <-> simmim_jax (convert.py)
  simmim-reconstruct    the SimMIM reconstruction of any image (reconstruct.py)
  simmim-aot            ahead-of-time compilation of a recipe's step for a TPU topology or a mesh (aot.py)
  simmim-prepare        an image folder -> ArrayRecord shards for data.source="array_record" (prepare.py)

`python -m simmim_jax.cli PROGRAM [flags]` runs any of them without the console scripts (PROGRAM: pretrain,
finetune, linear-probe, convert, reconstruct, aot, prepare); `python -m simmim_jax.main` is simmim-pretrain.

Each program defines its absl flags on its own `flags.FlagValues` when it starts (importing this module
defines nothing, so programs never share a flag, even in one process), reads `--config` with ml-collections'
`config_flags` (`--config.key=value` overrides a field; the config is locked, so a mistyped key is an error)
and returns its exit status: bad input or config 2, with one line naming the value and the fix; a run that
stopped (data, non-finite values, a failed write, out of memory) 1, with the reason; preempted after saving
143; Ctrl-C after saving 130 (a second Ctrl-C: 130 at once). Anything else is a bug and keeps its traceback.
`--help` prints the program's usage (its docstring) and its flags.
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

import ml_collections
from absl import flags
from ml_collections import config_flags

from simmim_jax.train import host_memory  # imports nothing that starts a thread
from simmim_jax.storage import logs
EXIT_BAD_INPUT, EXIT_FAILURE = 2, 1
_HELP = {"--help", "-h", "--helpshort", "--helpfull"}


class _Refused(Exception):
  """Bad input found by the command line itself; the message is the whole line after the program name."""


# ----------------------------------------------------------------------------------------------------
# The programs


def pretrain_main(argv=None) -> int:
  """simmim-pretrain: SimMIM pretraining; rerunning the same command resumes from the last checkpoint.

    simmim-pretrain --config=demo --workdir=workdir/demo
    simmim-pretrain --config=pretrain/vit_base_800ep --print_config
    simmim-pretrain --config=pretrain/vit_base_800ep --workdir=gs://BUCKET/vit_b \\
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets --config.model.remat=True

  --config names a packaged config (simmim_jax/configs/) or your own file; --config.KEY=VALUE overrides a
  field, and every field of the encoder can be set under --config.model.
  """
  return _train("simmim-pretrain", pretrain_main, argv)


def finetune_main(argv=None) -> int:
  """simmim-finetune: fine-tuning of a pretrained encoder (a simmim-pretrain or simmim-convert workdir).

    simmim-finetune --config=finetune/demo --workdir=workdir/demo_ft --config.pretrained=workdir/demo
    simmim-finetune --config=finetune/vit_base_800ep --workdir=gs://BUCKET/vit_b_ft \\
        --config.pretrained=gs://BUCKET/vit_b --config.data.data_dir=gs://BUCKET/tensorflow_datasets
  """
  return _train("simmim-finetune", finetune_main, argv)


def linear_probe_main(argv=None) -> int:
  """simmim-linear-probe: linear probing of a frozen pretrained encoder.

    simmim-linear-probe --config=linear_probe/demo --workdir=workdir/demo_probe --config.pretrained=workdir/demo
    simmim-linear-probe --config=linear_probe/vit_base --config.pretrained=workdir/vit_b --print_config
  """
  return _train("simmim-linear-probe", linear_probe_main, argv)


def convert_main(argv=None) -> int:
  """simmim-convert: official SimMIM / Hugging Face PyTorch weights <-> simmim_jax.

    simmim-convert --checkpoint=simmim_pretrain__swin_base__img192_window6__800ep.pth \\
        --encoder=swin_base_patch4_window6 --workdir=workdir/swin_b_800ep
    simmim-convert --checkpoint=workdir/swin_b_800ep --export --out=model.safetensors [--overwrite]
    simmim-convert --checkpoint=workdir/swin_b_800ep --export --format=hf --out=hf/swin_b_800ep
  """
  # A refused or unreadable weight file (torch_files.WeightFileError is a ValueError) or bad arguments.
  bad_input = (ValueError, FileNotFoundError, FileExistsError, pickle.UnpicklingError, zipfile.BadZipFile)
  return _run("simmim-convert", convert_main, argv, _convert_flags, _convert, bad_input=bad_input,
              config=("a pretraining config (optional): its model (name, fields, img_size) is the encoder, and with "
                      "--workdir, simmim-pretrain with the same --config continues from the weights", False))


def reconstruct_main(argv=None) -> int:
  """simmim-reconstruct: the SimMIM reconstruction of any image, from a converted or a trained model.

    simmim-reconstruct --checkpoint=workdir/swin_b_800ep --image=photo.jpg --out=grid.png
    simmim-reconstruct --checkpoint=simmim_pretrain.pth --encoder=vit_base_patch16 --image=photo.jpg --out=grid.png
  """
  return _run("simmim-reconstruct", reconstruct_main, argv, _reconstruct_flags, _reconstruct,
              bad_input=(ValueError, FileNotFoundError), failures=(OSError,))


def aot_main(argv=None) -> int:
  """simmim-aot: compiles the real step of a config's recipe (pretraining, fine-tuning, linear probe) for a Cloud
  TPU topology (the TPU compiler, from libtpu: pip install 'simmim_jax[tpu]') or for fake CPU devices, and
  prints per chip the memory against the chip's HBM, the compiler's FLOPs per step, the step time at 100% of
  peak (a lower bound) and the compile time. Exit 2 when the step does not fit, naming the ways out.

    simmim-aot --config=pretrain/vit_base_800ep --topology=v4:2x2x1 --config.mesh.fsdp=4
    simmim-aot --config=pretrain/swinv2_huge_800ep --topology=v5p:4x4x4 --num_slices=2 --config.mesh.fsdp=64
    XLA_FLAGS=--xla_force_host_platform_device_count=8 simmim-aot \\
        --config=pretrain/swin_large_800ep --config.global_batch_size=64 --config.mesh.fsdp=8
  """
  from simmim_jax.tools import aot  # pylint: disable=g-import-not-at-top

  return _run("simmim-aot", aot_main, argv, _aot_flags, _aot,
              config=("a pretraining, fine-tuning or linear-probe config", True),
              bad_input=(aot.DoesNotFit, ValueError))


def prepare_main(argv=None) -> int:
  """simmim-prepare: an image folder -> ArrayRecord shards for data.source="array_record" (Grain).

    simmim-prepare --images=imagenet/train --out=prepared --split=train
    simmim-prepare --images=imagenet/val --out=prepared --split=val
    simmim-pretrain --config=pretrain/vit_base_800ep --config.data.source=array_record \\
        --config.data.name= --config.data.data_dir=prepared

  Class sub-folders (<images>/<class>/<image>) become labels. Unreadable, oversized and non-image files are
  skipped and counted (--strict: exit 2 naming the first). Nothing is overwritten; an interrupted run leaves
  no shard behind (rerun it).
  """
  return _run("simmim-prepare", prepare_main, argv, _prepare_flags, _prepare,
              bad_input=(ValueError, FileNotFoundError, FileExistsError))


def _prepare_flags(values: flags.FlagValues) -> None:
  define = dict(flag_values=values)
  flags.DEFINE_string("images", None, "the image folder (flat, or <class>/<image>)", required=True, **define)
  flags.DEFINE_string("out", None, "the folder of prepared splits (local; copy it to a bucket after)",
                      required=True, **define)
  flags.DEFINE_string("split", "train", "the split name (config.data.split, train_split or eval_split)", **define)
  flags.DEFINE_integer("num_shards", 0, "0 = one shard per 1024 images", **define)
  flags.DEFINE_integer("max_image_pixels", 0, "larger declared sizes are skipped (0 = 40 M pixels)", **define)
  flags.DEFINE_bool("strict", False, "stop at the first file that cannot be read", **define)


def _prepare(values: flags.FlagValues) -> None:
  from simmim_jax.tools import prepare  # pylint: disable=g-import-not-at-top

  result = prepare.prepare(values.images, values.out, values.split, num_shards=values.num_shards,
                           max_image_pixels=values.max_image_pixels, strict=values.strict)
  print(f"simmim-prepare: wrote {result['records']} images in {result['shards']} shard(s) to "
        f"{os.path.join(values.out, values.split)} ({result['skipped']} skipped)", flush=True)


# ----------------------------------------------------------------------------------------------------
# Training: simmim-pretrain, simmim-finetune, simmim-linear-probe


# The registry of recipes: each training program and the module whose RECIPE (a run.Recipe) it runs. Imported
# after flag parsing, so --help stays fast.
RECIPES = {"simmim-pretrain": "simmim_jax.train.pretrain", "simmim-finetune": "simmim_jax.train.finetune",
           "simmim-linear-probe": "simmim_jax.train.linear_probe"}


def recipe_main(recipe, argv=None) -> int:
  """Runs any `run.Recipe` as the program `recipe.program`, with the flags, `--print_config`, preemption and
  the exit policy of simmim-pretrain (a recipe of your own: `sys.exit(cli.recipe_main(MyRecipe()))`)."""
  return _train(recipe.program, type(recipe), argv, recipe)  # --help shows the recipe's docstring


def _train(program: str, entry, argv, recipe=None) -> int:
  _prepare_process()
  return _run(program, entry, argv, _train_flags, lambda values: _train_recipe(recipe, program, values),
              config=("the recipe's config", True))


def _registered(program: str):
  return importlib.import_module(RECIPES[program]).RECIPE


def _prepare_process():
  """Process-wide settings that must precede every thread: the host allocator of CPU-only runs
  (simmim_jax/train/host_memory.py; JAX, TensorFlow and their thread pools are imported after this)."""
  host_memory.configure_for_cpu_only()


def _train_flags(values: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, images and run.log; rerunning with "
                      "the same workdir resumes (required unless --print_config).", flag_values=values)
  flags.DEFINE_bool("print_config", False, "Check the config, print it as it will run (every key), the model's "
                    "size and FLOPs, the steps and the batch per device, then whether the data is ready (or how to "
                    "prepare it), and exit without compiling or writing: 0 if the run would start, 2 if not.",
                    flag_values=values)
  flags.DEFINE_integer("verbosity", logs.verbosity_from_env(),
                       "0: progress, warnings and errors; 1: also the libraries' INFO logs (Orbax, absl, "
                       f"TensorFlow); 2: DEBUG. Default: ${logs.VERBOSITY_ENV} or 0. run.log in the workdir "
                       "always holds the INFO logs.", flag_values=values)
  # Multi-process runs: Cloud TPU VM slices, SLURM and Open MPI are detected; elsewhere pass all three.
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (jax.distributed).", flag_values=values)
  flags.DEFINE_integer("num_processes", None, "Number of processes (jax.distributed).", flag_values=values)
  flags.DEFINE_integer("process_id", None, "This process's index (jax.distributed).", flag_values=values)


def _train_recipe(recipe, program: str, values: flags.FlagValues) -> int | None:
  faulthandler.enable()  # a hard crash (in XLA, say) still prints the Python stack
  if not values.print_config and not values.workdir:
    raise _Refused(f"--workdir is required (a directory for this run; see {program} --help)")
  config = _load_config(values)
  logs.preload_quietly("tensorflow", values.verbosity)  # the input pipeline's; its load notices go to run.log
  from simmim_jax.train import run  # pylint: disable=g-import-not-at-top
  recipe = recipe or _registered(program)
  if values.print_config:  # one process, nothing written: no jax.distributed, no workdir
    # The run as it would be, also before its data exists (a dry run before the pod); the last lines say whether
    # the data is ready and the run fits this machine, and the status whether it would start (0) or be refused (2).
    resolved, facts = recipe.describe(config)
    print(f"{resolved.to_json_best_effort(indent=2, sort_keys=True)}\n{run.describe(resolved, facts)}", flush=True)
    return EXIT_BAD_INPUT if facts.get("data_not_ready") or facts.get("does_not_fit") else 0
  _start_distributed(values)
  run.train(recipe, config, values.workdir)


def _start_distributed(values: flags.FlagValues) -> None:
  """jax.distributed, before any backend starts."""
  from simmim_jax.train import distributed  # pylint: disable=g-import-not-at-top

  try:
    distributed.initialize(values.coordinator_address, values.num_processes, values.process_id)
  except ValueError as e:
    raise _Refused(f"configuration error: {_one_line(e)}") from None


# ----------------------------------------------------------------------------------------------------
# simmim-convert


def _convert_flags(values: flags.FlagValues) -> None:
  define = dict(flag_values=values)
  flags.DEFINE_string("checkpoint", None, ".pth / .bin / .safetensors / .npz state dict (with --export: a "
                      "simmim-pretrain or simmim-finetune workdir)", required=True, **define)
  flags.DEFINE_string("encoder", None, "(required unless --export or --config) registry name, e.g. "
                      "vit_base_patch16, swin_base_patch4_window6, swinv2_base_patch4_window12, "
                      "vit_base_patch16_plain", **define)
  flags.DEFINE_multi_string("override", [], "FIELD=VALUE encoder field override (a Python / JSON literal), e.g. "
                            "img_size=192 (repeatable)", **define)
  flags.DEFINE_string("workdir", None, "write a simmim-pretrain workdir (SimMIM checkpoints): a new or empty folder, "
                      "or a workdir of the same model without checkpoints (nothing else is overwritten)", **define)
  flags.DEFINE_string("out", None, "write the converted Flax params (.npz, '/'-joined paths) or, with --export, "
                      "the official-format state dict (.safetensors or .npz) or the HF model folder", **define)
  flags.DEFINE_bool("export", False, "read a simmim-pretrain or simmim-finetune workdir given as --checkpoint and "
                    "write it to --out in --format", **define)
  flags.DEFINE_enum("format", "official", ["official", "hf"], "with --export: 'official' = the official SimMIM / "
                    "Swin state dict file; 'hf' = a transformers folder (config.json + model.safetensors) for "
                    "from_pretrained (ViT / Swin / Swinv2ForMaskedImageModeling, BeitModel, *ForImageClassification)",
                    **define)
  flags.DEFINE_bool("overwrite", False, "replace an existing --out file (atomically: written to a temporary file "
                    "beside it, then renamed); without it an existing file is refused. An HF folder (--format=hf) "
                    "must always be new or empty.", **define)


def _convert(values: flags.FlagValues) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  from simmim_jax.storage import convert, torch_files  # pylint: disable=g-import-not-at-top
  from simmim_jax import models

  if values.export:
    from simmim_jax.storage import hf_export, workdir as workdir_lib  # pylint: disable=g-import-not-at-top

    if not values.out:
      raise ValueError("--export needs --out=FILE.safetensors (or .npz; with --format=hf a new folder)")
    if values.format == "hf" and values.overwrite:
      raise ValueError("--overwrite replaces an --out file; an HF export (--format=hf) goes to a new or empty folder")
    if values.format != "hf":
      _check_out_file(values.out, values.overwrite)
    model, variables, _ = workdir_lib.load_model(values.checkpoint)  # read-only; by the recipe that wrote it
    if values.format == "hf":
      architecture = hf_export.export(model, variables, values.out)
      print(f"wrote {values.checkpoint} as a transformers {architecture} to {values.out} "
            f"({hf_export.CONFIG_FILENAME} + {hf_export.WEIGHTS_FILENAME})")
      return
    _write_arrays(values.out, convert.to_torch(model, variables), values.overwrite)
    print(f"wrote the official-format state dict of {values.checkpoint} to {values.out}")
    return
  if values["format"].present:
    raise ValueError("--format applies to --export (a workdir -> PyTorch); reading detects the format")
  config = _load_config(values) if len(values.config) else None  # an empty ConfigDict: no --config
  encoder = values.encoder
  overrides = dict(_parse_override(o) for o in values.override)
  if config is not None:  # the config's encoder (name, fields, img_size); --encoder / --override win
    encoder = encoder or config.model.name
    overrides = {**models.field_overrides(config.model), "img_size": config.img_size, **overrides}
  if not encoder:
    raise ValueError("--encoder=NAME is required (models.list_encoders(): e.g. vit_base_patch16)")
  if not (values.workdir or values.out):
    raise ValueError("give --workdir=DIR (a simmim-pretrain workdir) and/or --out=FILE.npz")
  if values.out:
    _check_out_file(values.out, values.overwrite)
  state_dict = torch_files.load_state_dict(values.checkpoint)
  fmt = convert.to_official_keys(state_dict)[1]
  model, variables = convert.from_torch(state_dict, encoder=encoder, **overrides)
  print(f"{values.checkpoint}: {fmt} format, {type(model).__name__} with {encoder} encoder, "
        f"{sum(np.size(v) for v in jax.tree.leaves(variables)):,} parameters")
  workdir_overrides = {**convert.layout_overrides(state_dict, encoder), **overrides}
  if values.workdir:  # checked before anything is written (--out included)
    from simmim_jax.storage import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

    workdir_lib.check_convert_target(values.workdir, convert.workdir_config(
        model, variables, encoder=encoder, overrides=workdir_overrides, config=config))
  if values.out:
    _write_arrays(values.out, traverse_util.flatten_dict(variables["params"], sep="/"), values.overwrite)
    print(f"wrote {values.out}")
  if values.workdir:
    convert.save_workdir(values.workdir, model, variables, encoder=encoder, overrides=workdir_overrides,
                         config=config, source=os.path.abspath(values.checkpoint))
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


def _check_out_file(path: str, overwrite: bool) -> None:
  """--out of simmim-convert: a .npz / .safetensors file name that is not a folder, and not an existing file
  unless --overwrite. Reads only."""
  if not path.endswith((".safetensors", ".npz")):
    raise ValueError(f"--out={path}: use a .npz or .safetensors file name")
  if os.path.isdir(path) and not os.path.islink(path):
    raise ValueError(f"--out={path} is a folder: give a file name")
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(f"--out={path} exists: pass --overwrite to replace it, or give another file name")


def _write_arrays(path: str, arrays: dict, overwrite: bool) -> None:
  """Writes `arrays` to the .safetensors / .npz file `path` atomically (safe_files: a temporary file beside it,
  renamed; never through a link), refusing an existing file unless `overwrite`."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from simmim_jax.storage import safe_files, torch_files  # pylint: disable=g-import-not-at-top

  _check_out_file(path, overwrite)
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  if path.endswith(".safetensors"):
    torch_files.write_safetensors(path, arrays, overwrite=overwrite)
  else:
    with safe_files.atomic_file(path, overwrite=overwrite) as f:
      np.savez(f, **arrays)


# ----------------------------------------------------------------------------------------------------
# simmim-reconstruct


def _reconstruct_flags(values: flags.FlagValues) -> None:
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
  from simmim_jax.tools import reconstruct  # pylint: disable=g-import-not-at-top
  from simmim_jax.storage import visualize

  overrides = {"img_size": values.img_size} if values.img_size else {}
  model, variables, mask_patch_size = reconstruct.load_simmim(values.checkpoint, values.encoder, **overrides)
  image = reconstruct.load_image(values.image, model.encoder.img_size)
  grid = reconstruct.reconstruct(model, variables, image, mask_patch_size=values.mask_patch_size or mask_patch_size,
                                 mask_ratio=values.mask_ratio, seed=values.seed,
                                 scale=values.scale or max(1, 256 // model.encoder.img_size))
  visualize.save_png(grid, values.out)
  print(f"wrote {values.out}: original | masked | prediction | prediction pasted into the visible pixels")


# ----------------------------------------------------------------------------------------------------
# simmim-aot


def _aot_flags(values: flags.FlagValues) -> None:
  define = {"flag_values": values}
  flags.DEFINE_string("topology", None, "a Cloud TPU topology to compile for with the TPU compiler (needs libtpu: "
                      "pip install 'simmim_jax[tpu]'), e.g. v5e:2x2, v6e:8x8, v4:2x2x1, v5p:4x4x4; without libtpu, "
                      "fake CPU devices stand in (XLA_FLAGS=--xla_force_host_platform_device_count=N)", **define)
  flags.DEFINE_integer("num_slices", 1, "slices of --topology joined by the data-centre network (sets "
                       "config.mesh.slices: data parallel across slices, FSDP within one)", **define)


def _aot(values: flags.FlagValues) -> int:
  import jax  # pylint: disable=g-import-not-at-top

  from simmim_jax.tools import aot  # pylint: disable=g-import-not-at-top
  from simmim_jax.train import validation

  config = _load_config(values)
  # The mesh and the batch are checked against the target's devices (aot.compile_for), not this machine's.
  local = config.copy_and_resolve_references()
  with local.unlocked():
    local.mesh.data, local.mesh.fsdp, local.mesh.slices = -1, 1, 1
    local.global_batch_size = jax.device_count()
  recipe, build_step = _aot_recipe(config)
  if recipe == "pretraining":
    from simmim_jax.train import pretrain  # pylint: disable=g-import-not-at-top
    pretrain.validate_config(local, check_data=False)
  else:
    validation.check_run(local)
  result = aot.compile_for(config, build_step, topology=values.topology, num_slices=values.num_slices)
  print(f"simmim-aot: the {config.model.name} {recipe} step "
        f"(global batch {config.global_batch_size}, {config.dtype}, remat={bool(config.model.get('remat', False))}, "
        f"scan_blocks={bool(config.model.get('scan_blocks', False))})\n{result.table()}", flush=True)
  if result.fits is False:
    raise aot.DoesNotFit(aot.ways_out(config, result))
  return 0


def _aot_recipe(config):
  """(recipe name, build_step(config, mesh) -> run.StepSetup) of a config: a linear-probe config has
  `probe_blocks`, a fine-tuning config `num_classes`, else pretraining. Fine-tuning and the probe compile with
  a randomly initialized encoder of the pretrained run's model (its config.json when `pretrained` names one)
  and the config's classes (1000 when the data would say)."""
  program = ("simmim-pretrain" if "num_classes" not in config else
             "simmim-finetune" if "probe_blocks" not in config else "simmim-linear-probe")
  recipe = _registered(program)
  if program == "simmim-pretrain":
    return "pretraining", lambda config, mesh: recipe.build(config, mesh).setup
  from simmim_jax.train import downstream  # pylint: disable=g-import-not-at-top

  def resolved(config):
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.model = ml_collections.ConfigDict(downstream.resolve_model_fields(config))
      config.num_classes = config.num_classes or 1000
      config.num_train_images = config.get("num_train_images") or 1281167  # ImageNet-1K: the schedule only
    return config

  name = "fine-tuning" if program == "simmim-finetune" else "linear-probe"
  return name, lambda config, mesh: recipe.build(resolved(config), mesh).setup


# ----------------------------------------------------------------------------------------------------
# What every program shares: flags, --help, config loading, the exit policy


def _run(program: str, entry, argv, define, body, *, config: tuple[str, bool] | None = None, bad_input=(),
         failures=()) -> int:
  """Defines the program's flags (`define(values)`, and with `config=(what, required)` the --config flag),
  answers --help, parses `argv` (default sys.argv[1:]) and runs `body(values)` under the exit policy; returns
  the exit status."""
  argv = [program, *(sys.argv[1:] if argv is None else argv)]
  values = flags.FlagValues()
  define(values)
  config_problem = None
  if config is not None:
    argv, config_problem = _config_flag(values, argv, *config)
  if _HELP & set(argv[1:]):
    print(f"{inspect.getdoc(entry)}\n\nflags:\n{_flags_help(values)}")
    return 0
  try:
    if config_problem:
      raise _Refused(config_problem)
    rest = _parse_flags(values, argv)
    if rest[1:]:
      raise _Refused(f"unexpected argument {rest[1]!r}: every option is a --flag=value (see {program} --help)")
  except _Refused as e:
    return _refuse(program, str(e))
  flags.FLAGS.mark_as_parsed()  # absl logging's own flags keep their defaults (as under absl.app.run)
  logs.configure(values.verbosity if "verbosity" in values else logs.verbosity_from_env())
  return run_program(program, lambda: body(values), bad_input=bad_input, failures=failures)


def _config_flag(values: flags.FlagValues, argv: list[str], what: str, required: bool) -> tuple[list[str], str | None]:
  """Loads --config (a packaged name or a file: simmim_jax.configs), adds to its `model` block the encoder
  fields that overrides name, and defines it as a locked ml-collections flag with its --config.KEY=VALUE
  overrides. Returns `argv` without --config and what is wrong with the config (None when it loaded)."""
  from simmim_jax import configs  # pylint: disable=g-import-not-at-top

  spec, argv = _pop_flag(argv, "config")
  config, problem = ml_collections.ConfigDict(), None
  if spec is None and required:
    problem = f"--config is required: a packaged config ({', '.join(configs.names()[:3])}, ...) or a config file"
  elif spec is not None:
    try:
      config = configs.load(spec)
      _refuse_block_overrides(config, argv)
      _add_model_fields(config, argv)
    except _Refused as e:
      problem = str(e)
    except FileNotFoundError as e:  # neither a file nor a packaged name: the message says which are
      problem = f"configuration error: {e}"
    except Exception as e:  # pylint: disable=broad-except  (any error of the user's config file is bad input)
      problem = f"configuration error: cannot load --config={spec}: {_last_line(e)}"
  helptext = (f"{what}: a packaged config name ({', '.join(configs.names())}) or a config file; "
              "--config.KEY=VALUE overrides any of its fields (every encoder field under --config.model.)")
  if problem is None:
    try:  # ml-collections defines a flag per override now: an override naming no field fails here
      config_flags.DEFINE_config_dict("config", config, helptext, flag_values=values, lock_config=True, sys_argv=argv)
      return argv, None
    except (AttributeError, KeyError) as e:
      problem = f"configuration error: {unknown_key_message(e, argv)}"
      values.remove_flag_values([name for name in values if name.startswith("config")])
  config_flags.DEFINE_config_dict("config", config, helptext, flag_values=values, lock_config=True,
                                  sys_argv=[a for a in argv if not a.startswith("--config.")])  # refused anyway
  return argv, problem


def _pop_flag(argv: list[str], name: str) -> tuple[str | None, list[str]]:
  """(the value of --NAME=V / --NAME V, or None; argv without it)."""
  rest, value, i = [], None, 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value, i = argv[i + 1], i + 1
    else:
      rest.append(arg)
    i += 1
  return value, rest


def _refuse_block_overrides(config: ml_collections.ConfigDict, argv: list[str]) -> None:
  """`--config.data="{'source': 'demo'}"` would replace the whole block (dropping every field it does not name,
  which the run reads later): refused in one line, as is every override of a block rather than a field."""
  for arg in argv[1:]:
    match = re.match(r"--config\.([^=]+)(?:=|$)", arg)
    if not match:
      continue
    node, key = config, match.group(1)
    for part in key.split("."):
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if isinstance(node, ml_collections.ConfigDict):
      example = next(iter(node.keys()), "FIELD")
      raise _Refused(f"configuration error: --config.{key} would replace the whole config.{key} block: set its "
                     f"fields one by one (--config.{key}.{example}=VALUE, ...)")


def _add_model_fields(config: ml_collections.ConfigDict, argv: list[str]) -> None:
  """Every field of the chosen encoder may be overridden (--config.model.remat=True, mlp_ratio, window_size,
  ...), not only those the config file sets: each field an override names is added to `config.model` at
  the encoder's value first. A field the encoder does not have is refused with the list of valid ones."""
  from simmim_jax import models  # pylint: disable=g-import-not-at-top

  if "model" not in config or "name" not in config.model:
    return
  named = {}
  for arg in argv[1:]:
    match = re.match(r"--config\.model\.([^=.]+)(?:=(.*))?$", arg)
    if match:
      named[match.group(1)] = match.group(2)
  name = named.get("name") or config.model.name
  try:
    fields = models.configurable_fields(name)
  except ValueError as e:
    raise _Refused(f"configuration error: config.model.name={name!r}: {_one_line(e)}") from None
  for field in named:
    if field == "name":
      continue
    if field not in fields:
      why = "comes from config.img_size" if field == "img_size" else "is not a field of that encoder"
      raise _Refused(f"configuration error: --config.model.{field}: {field} {why} ({name}); its fields: "
                     f"{', '.join(sorted(fields))}")
    if field in config.model and type(config.model[field]) is type(fields[field]):
      continue
    with config.unlocked():  # absent, or of another type (--config.model.name changed the encoder family)
      if field in config.model:
        del config.model[field]
      config.model[field] = fields[field]


def _flags_help(values: flags.FlagValues) -> str:
  text = values.get_help(include_special_flags=False).replace("\n    (default: '{}\n    ')", "")  # --config
  return "\n".join(line for line in text.splitlines() if line.startswith(" "))  # without absl's module headings


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


def _load_config(values: flags.FlagValues) -> ml_collections.ConfigDict:
  """The --config with its overrides (loaded, or refused in one line, before the flags were parsed)."""
  return values.config


def run_program(program: str, body, *, bad_input=(), failures=()) -> int:
  """Runs `body()` and turns the errors a user can act on into one line and the exit status: a config or
  input the program refuses -> 2 (ConfigError, a busy workdir, a symbolic link or an unwritable file where we
  write: safe_files.PathRefusedError, and the program's `bad_input` types); a run that stopped (data, non-finite
  values, a failed write such as a full disk naming its step, out of accelerator memory, SIGTERM before the
  first step, the program's `failures`) -> 1; preempted after saving -> 143; Ctrl-C after saving (or before
  the first step) -> 130. Anything else is a bug: its traceback is kept. A `body` that returns a status
  (--print_config of a run that would be refused: 2) exits with it."""
  try:
    return body() or 0
  except _Refused as e:
    return _refuse(program, str(e))
  except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves and raises run.Interrupted instead)
    print(f"{program}: stopped by Ctrl-C; nothing more was written (a training run resumes from its last "
          "checkpoint when the same command is rerun)", file=sys.stderr, flush=True)
    return 130
  except Exception as e:  # pylint: disable=broad-except  (classified below; anything else is re-raised)
    # Imported only now: a program that fails imports what classifies its error, and nothing more.
    from simmim_jax.storage import checkpoint  # pylint: disable=g-import-not-at-top
    from simmim_jax import data
    from simmim_jax.train import run, validation
    from simmim_jax.storage import safe_files  # pylint: disable=g-import-not-at-top
    from simmim_jax.storage import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

    if isinstance(e, (validation.ConfigError, workdir_lib.WorkdirBusyError)):
      return _refuse(program, f"configuration error: {_one_line(e)}")
    if isinstance(e, safe_files.PathRefusedError):  # a link, or no permission, where we write
      return _refuse(program, f"refused: {_one_line(e)}")
    if isinstance(e, bad_input):
      return _refuse(program, _one_line(e))
    if isinstance(e, (run.Preempted, run.Interrupted)):  # saved (or nothing to save): 143, Ctrl-C 130
      print(f"{program}: {e}", flush=True)
      return e.exit_code
    if isinstance(e, (run.NonFiniteError, FloatingPointError, checkpoint.CheckpointWriteError, data.DataError,
                      run.OutOfMemoryError, run.StoppedBeforeStart, safe_files.WriteFailedError, *failures)):
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
            "convert": convert_main, "reconstruct": reconstruct_main, "aot": aot_main, "prepare": prepare_main}


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
