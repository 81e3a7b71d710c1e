"""`simmim-convert --export --format=hf`: simmim_jax models as transformers folders (hf_export.py).

Parity: tiny models with perturbed weights are exported, loaded in PyTorch with `<class>.from_pretrained(DIR)`
(every key used, none missing) and run on the same images and masks: reconstruction and loss, BeitModel's
hidden states, classifier logits agree within 1e-4 (one PyTorch subprocess, under $SIMMIM_TORCH_PYTHON).
Round trip (no PyTorch): the written folder reads back (`hf_export.from_hf`) as the same module with the same
parameters. Refusals: layouts HF has no class for exit 2 with one line and leave the workdir as it was.
"""

import contextlib
import json
import os
import subprocess
import tracemalloc

import jax
import ml_collections
import numpy as np
import pytest

from simmim_jax.storage import checkpoint, convert, hf_export, torch_files
from simmim_jax import cli, masking, models
from simmim_jax.configs import finetune_config
from simmim_jax.storage import workdir as workdir_lib
from simmim_jax.models.classifier import Classifier
from helpers import full_disk, run_process, snapshot

TOLERANCE = 1e-4
TORCH_PYTHON = os.environ.get("SIMMIM_TORCH_PYTHON")
needs_torch = pytest.mark.skipif(
    not TORCH_PYTHON, reason="SIMMIM_TORCH_PYTHON is unset: no PyTorch interpreter with transformers for the "
    "from_pretrained parity tests (.ci/run creates .venv-torch with torch==2.13.0 transformers==4.57.6)")

# Runs under $SIMMIM_TORCH_PYTHON: argv = inputs.npz, then folders; writes <folder>/torch_out.npz + loading.json.
TORCH_SCRIPT = r'''
import json, os, sys
import numpy as np
import torch
import transformers

torch.set_num_threads(2)
inputs = np.load(sys.argv[1])
pixels = torch.from_numpy(inputs["images"]).permute(0, 3, 1, 2).contiguous()
masked = torch.from_numpy(inputs["mask"].reshape(inputs["mask"].shape[0], -1).astype(bool))
for folder in sys.argv[2:]:
  with open(os.path.join(folder, "config.json")) as f:
    architecture = json.load(f)["architectures"][0]
  model, info = getattr(transformers, architecture).from_pretrained(folder, output_loading_info=True)
  model.eval()
  out = {}
  with torch.no_grad():
    if architecture.endswith("ForMaskedImageModeling"):
      result = model(pixel_values=pixels, bool_masked_pos=masked)
      out = {"reconstruction": result.reconstruction.permute(0, 2, 3, 1).numpy(), "loss": result.loss.numpy()}
    elif architecture == "BeitModel":
      result = model(pixel_values=pixels, bool_masked_pos=masked)
      out = {"last_hidden_state": result.last_hidden_state.numpy()}
    else:
      out = {"logits": model(pixel_values=pixels).logits.numpy()}
  np.savez(os.path.join(folder, "torch_out.npz"), **out)
  with open(os.path.join(folder, "loading.json"), "w") as f:
    json.dump({"class": type(model).__name__, "dtype": str(next(model.parameters()).dtype),
               **{k: [str(x) for x in v] for k, v in info.items()}}, f)
'''


def perturbed(model, seed: int) -> dict:
  """Random parameters of `model`'s shapes (no init run): N(0, 0.1) everywhere, around 1 for LayerNorm scales
  and log 10 for SwinV2's logit scale, so zero-initialized biases, mask tokens, relative position tables,
  layer scales and post-norms all matter."""
  rng = np.random.default_rng(seed)

  def draw(path, struct):
    leaf = path[-1].key
    base = np.log(10.0) if leaf == "logit_scale" else 1.0 if leaf == "scale" else 0.0
    return (base + rng.normal(0, 0.1, struct.shape)).astype(np.float32)

  return {"params": jax.tree_util.tree_map_with_path(draw, convert.abstract_params(model))}


def simmim(name, **fields):
  encoder = models.create_encoder(name, **fields)
  return models.SimMIM(encoder=encoder, encoder_stride=encoder.output_stride)


def classifier(name, num_classes=5, **fields):
  return Classifier(encoder=models.create_encoder(name, **fields), num_classes=num_classes)


SWIN_TWO_STAGES = dict(depths=(2, 2), num_heads=(1, 2))  # 8x8 shifted, 4x4 = one window (HF V1 keeps its table)
# name -> (model, transformers class). Fields away from HF's defaults so that a field config.json lost shows.
CASES = {
    "vit_mim": (lambda: simmim("vit_test_tiny_plain", layer_norm_eps=1e-2), "ViTForMaskedImageModeling"),
    "swin_mim": (lambda: simmim("swin_test_tiny", **SWIN_TWO_STAGES), "SwinForMaskedImageModeling"),
    "swinv2_mim": (lambda: simmim("swinv2_test_tiny"), "Swinv2ForMaskedImageModeling"),  # 3rd stage clipped
    "beit_mim": (lambda: simmim("vit_test_tiny"), "BeitModel"),  # official SimMIM ViT: shared RPB, layer scale
    "vit_cls": (lambda: classifier("vit_test_tiny_plain", approximate_gelu=True, qkv_bias=False),
                "ViTForImageClassification"),
    "beit_cls": (lambda: classifier("vit_test_tiny", use_rel_pos_bias=True, use_shared_rel_pos_bias=False,
                                    use_mean_pooling=True, mlp_ratio=3.0), "BeitForImageClassification"),
    "swin_cls": (lambda: classifier("swin_test_tiny", num_classes=3, mlp_ratio=2.0, qkv_bias=False,
                                    **SWIN_TWO_STAGES), "SwinForImageClassification"),
    "swinv2_cls": (lambda: classifier("swinv2_test_tiny", pretrained_window_sizes=(3, 3, 0)),
                   "Swinv2ForImageClassification"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """{name: (model, variables, folder)}, each exported once."""
  root = tmp_path_factory.mktemp("hf")
  result = {}
  for i, (name, (build, _)) in enumerate(CASES.items()):
    model = build()
    variables = perturbed(model, seed=i)
    folder = str(root / name)
    hf_export.export(model, variables, folder)
    result[name] = (model, variables, folder)
  return result


def test_each_model_maps_to_its_transformers_class():
  for name, (build, architecture) in CASES.items():
    assert hf_export.hf_target(build())[0] == architecture, name


@pytest.mark.parametrize("name", list(CASES))
def test_export_reads_back_as_the_same_module_and_parameters(exported, name):
  """config.json holds every field (the module read back is equal) and the weights are bit-identical."""
  model, variables, folder = exported[name]
  assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
  again, again_variables = hf_export.from_hf(folder)
  if name == "beit_mim":  # BeitModel holds the encoder (with its mask token); the SimMIM head has no HF class
    model, variables = model.encoder, {"params": variables["params"]["encoder"]}
  assert again == model
  flat, flat_again = (jax.tree_util.tree_flatten_with_path(v)[0] for v in (variables, again_variables))
  assert [p for p, _ in flat] == [p for p, _ in flat_again]
  assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(flat, flat_again))


def test_config_json_takes_the_fields_of_the_module_not_hf_defaults(exported):
  def config(name):
    with open(os.path.join(exported[name][2], "config.json")) as f:
      return json.load(f)

  vit, beit, swinv2 = config("vit_mim"), config("beit_mim"), config("swinv2_cls")
  assert vit["layer_norm_eps"] == 1e-2 and vit["encoder_stride"] == 4 and vit["qkv_bias"] is True
  assert vit["hidden_act"] == "gelu" and config("vit_cls")["hidden_act"] == "gelu_pytorch_tanh"
  assert beit["layer_norm_eps"] == 1e-6 and beit["layer_scale_init_value"] == 0.1 and beit["use_mask_token"]
  assert beit["use_shared_relative_position_bias"] and not beit["use_relative_position_bias"]
  assert not beit["use_absolute_position_embeddings"] and not beit["use_mean_pooling"]
  assert config("beit_cls")["intermediate_size"] == 96 and config("beit_cls")["use_mean_pooling"]
  assert config("swin_cls")["mlp_ratio"] == 2.0 and config("swin_cls")["qkv_bias"] is False
  assert config("swin_mim")["encoder_stride"] == 8 and config("swin_mim")["depths"] == [2, 2]
  assert swinv2["pretrained_window_sizes"] == [3, 3, 0] and swinv2["window_size"] == 4
  assert swinv2["num_labels"] == 5 and len(swinv2["id2label"]) == 5


@pytest.fixture(scope="module")
def torch_outputs(exported, tmp_path_factory):
  """Runs every exported folder through transformers once; returns (images, mask)."""
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  mask = np.asarray(masking.random_mask(jax.random.key(0), 2, input_size=32, mask_patch_size=8,
                                        model_patch_size=4, mask_ratio=0.6))  # [2, 8, 8]
  work = tmp_path_factory.mktemp("torch")
  np.savez(work / "inputs.npz", images=images, mask=mask)
  (work / "run.py").write_text(TORCH_SCRIPT)
  result = run_process([TORCH_PYTHON, work / "run.py", work / "inputs.npz",
                        *(folder for _, _, folder in exported.values())])
  assert result.returncode == 0, result.stderr[-4000:]
  return images, mask


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@needs_torch
@pytest.mark.parametrize("name", list(CASES))
def test_transformers_from_pretrained_computes_what_simmim_jax_computes(exported, torch_outputs, name):
  images, mask = torch_outputs
  model, variables, folder = exported[name]
  with open(os.path.join(folder, "loading.json")) as f:
    loading = json.load(f)
  assert loading["class"] == CASES[name][1] and loading["dtype"] == "torch.float32"
  assert loading["missing_keys"] == [] and loading["unexpected_keys"] == [] and loading["mismatched_keys"] == []
  expected = np.load(os.path.join(folder, "torch_out.npz"))
  if name == "beit_mim":
    out = model.encoder.apply({"params": variables["params"]["encoder"]}, images, mask)
    hidden = expected["last_hidden_state"]  # [B, 1 + N, D]: normed cls, then the patch tokens
    assert max_diff(out["pooled"], hidden[:, 0]) <= TOLERANCE
    assert max_diff(out["feature_map"].reshape(hidden[:, 1:].shape), hidden[:, 1:]) <= TOLERANCE
  elif name.endswith("_mim"):
    out = jax.jit(model.apply)(variables, images, mask)
    assert expected["reconstruction"].shape == images.shape
    assert max_diff(out["reconstruction"], expected["reconstruction"]) <= TOLERANCE
    assert max_diff(out["loss"], expected["loss"]) <= TOLERANCE
  else:
    logits = jax.jit(model.apply)(variables, images)
    assert expected["logits"].shape == logits.shape
    assert max_diff(logits, expected["logits"]) <= TOLERANCE


# ----------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("build, lacks", [
    (lambda: simmim("swin_test_tiny"), "HF SwinLayer keeps a table for config.window_size"),  # 2x2 stage, window 4
    (lambda: simmim("swin_test_tiny", ape=True, **SWIN_TWO_STAGES), "use_absolute_embeddings"),
    (lambda: simmim("swinv2_test_tiny", patch_norm=False), "patch_norm=False"),
    (lambda: simmim("vit_test_tiny", qkv_bias_layout="qkv"), "BeitSelfAttention's key has no bias"),
    (lambda: classifier("vit_test_tiny_plain", use_mean_pooling=True, qkv_bias=False), "query and value biases"),
    (lambda: models.SimMIM(encoder=models.create_encoder("swinv2_test_tiny"), encoder_stride=16,
                           norm_target_window=47), "no locally normalized targets"),
    (lambda: models.create_encoder("swin_test_tiny", **SWIN_TWO_STAGES), "not a bare SwinTransformer"),
])
def test_layouts_without_a_transformers_class_are_refused_naming_what_hf_lacks(build, lacks):
  with pytest.raises(hf_export.UnsupportedError, match="Hugging Face|HF|bare") as error:
    hf_export.hf_target(build())
  assert lacks in str(error.value)


def pretrain_workdir(path, name, **fields):
  model = simmim(name, **fields)
  convert.save_workdir(str(path), model, perturbed(model, 7), encoder=name, overrides=fields)
  return str(path)


def test_cli_refuses_an_unsupported_workdir_with_one_line_and_touches_nothing(tmp_path, capsys):
  workdir = pretrain_workdir(tmp_path / "swin", "swin_test_tiny")  # its last stage (2x2) is below the window
  before = snapshot(workdir)
  out = tmp_path / "hf"
  assert cli.convert_main([f"--checkpoint={workdir}", "--export", "--format=hf", f"--out={out}"]) == 2
  message = capsys.readouterr().err.strip()
  assert len(message.splitlines()) == 1 and "HF SwinLayer keeps a table for config.window_size" in message
  assert snapshot(workdir) == before and not out.exists()


def test_cli_exports_a_pretraining_workdir_and_keeps_the_official_default(tmp_path):
  workdir = pretrain_workdir(tmp_path / "vit", "vit_test_tiny_plain")
  before = snapshot(workdir)
  model, variables, _ = workdir_lib.load_model(workdir)
  out = tmp_path / "hf"
  assert cli.convert_main([f"--checkpoint={workdir}", "--export", "--format=hf", f"--out={out}"]) == 0
  again, again_variables = hf_export.from_hf(str(out))
  assert again == model and jax.tree.all(jax.tree.map(np.array_equal, again_variables, variables))
  official = tmp_path / "official.safetensors"
  assert cli.convert_main([f"--checkpoint={workdir}", "--export", f"--out={official}"]) == 0
  assert convert.detect_format(torch_files.load_state_dict(str(official))) == "official"
  assert cli.convert_main([f"--checkpoint={workdir}", "--export", "--format=hf", f"--out={out}"]) == 2  # not empty
  assert cli.convert_main([f"--checkpoint={official}", "--encoder=vit_test_tiny_plain", "--format=hf",
                           f"--out={tmp_path / 'x.npz'}"]) == 2  # --format is for --export only
  assert snapshot(workdir) == before


def test_cli_exports_a_finetune_workdir_as_an_image_classifier(tmp_path):
  """A simmim-finetune workdir (config.json + a train-state checkpoint) -> SwinForImageClassification."""
  config = finetune_config.get_config()
  config.model = ml_collections.ConfigDict(dict(name="swin_test_tiny", **SWIN_TWO_STAGES))
  config.img_size, config.num_classes, config.head_init_scale = 32, 4, 1.0
  model = Classifier(encoder=models.create_encoder("swin_test_tiny", img_size=32, **SWIN_TWO_STAGES),
                     num_classes=4, head_init_scale=1.0)
  variables = perturbed(model, 11)
  workdir = str(tmp_path / "ft")
  os.makedirs(workdir)
  workdir_lib.write_config(workdir, config, recipe="finetune")
  checkpointer = checkpoint.Checkpointer(workdir_lib.checkpoint_dir(workdir))
  checkpointer.save(5, {"step": np.int32(5), "params": variables["params"], "opt_state": {"mu": np.zeros(3)}},
                    {"step": 5})
  checkpointer.close()
  before = snapshot(workdir)
  out = tmp_path / "hf"
  assert cli.convert_main([f"--checkpoint={workdir}", "--export", "--format=hf", f"--out={out}"]) == 0
  assert json.loads((out / "config.json").read_text())["architectures"] == ["SwinForImageClassification"]
  again, again_variables = hf_export.from_hf(str(out))
  assert isinstance(again, Classifier) and again.num_classes == 4
  assert jax.tree.all(jax.tree.map(np.array_equal, again_variables, variables))
  assert snapshot(workdir) == before


@pytest.mark.parametrize("legacy", [False, True], ids=["recipe", "legacy"])
def test_cli_refuses_a_linear_probe_workdir(tmp_path, capsys, legacy):
  """By the recipe config.json records, or (written before it recorded one) by the probe's config."""
  workdir = str(tmp_path / "probe")
  os.makedirs(workdir)
  config = finetune_config.get_linear_probe_config()
  workdir_lib.write_config(workdir, config, recipe="linear_probe")
  if legacy:
    (tmp_path / "probe" / "config.json").write_text(json.dumps(config.to_dict()))
  before = snapshot(workdir)
  assert cli.convert_main([f"--checkpoint={workdir}", "--export", "--format=hf", f"--out={tmp_path / 'hf'}"]) == 2
  assert "simmim-linear-probe workdir" in capsys.readouterr().err
  assert snapshot(workdir) == before and not (tmp_path / "hf").exists()


def test_a_full_disk_during_hf_export_is_exit_1_leaves_nothing_and_a_rerun_works(tmp_path, monkeypatch, capsys):
  workdir = pretrain_workdir(tmp_path / "vit", "vit_test_tiny_plain")
  out = tmp_path / "exports" / "hf"
  with monkeypatch.context() as patch:
    full_disk(patch, after_bytes=4096)  # inside model.safetensors
    assert cli.convert_main([f"--checkpoint={workdir}", "--export", "--format=hf", f"--out={out}"]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "stopped: cannot write" in err and "No space left on device" in err, err
  assert os.listdir(tmp_path / "exports") == []  # no truncated model.safetensors, no temporary folder
  assert cli.convert_main([f"--checkpoint={workdir}", "--export", "--format=hf", f"--out={out}"]) == 0
  assert sorted(os.listdir(out)) == [hf_export.CONFIG_FILENAME, hf_export.WEIGHTS_FILENAME]


@contextlib.contextmanager
def tiny_disk(folder, size="256k"):
  """A tmpfs of `size` mounted at `folder` (root only; the test is skipped where mounting is not allowed)."""
  folder.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                           capture_output=True, check=False)
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
  try:
    yield folder
  finally:
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.slow
def test_a_real_full_disk_never_leaves_a_half_written_export_or_destroys_the_old_file(tmp_path, capsys):
  """A tmpfs smaller than the model: the HF folder is absent, the user's old official file is intact."""
  workdir = pretrain_workdir(tmp_path / "vit", "vit_test_tiny_plain", embed_dim=128, depth=4)
  with tiny_disk(tmp_path / "disk", size="256k") as disk:
    assert cli.convert_main([f"--checkpoint={workdir}", "--export", "--format=hf", f"--out={disk / 'hf'}"]) == 1
    official = disk / "model.safetensors"
    official.write_bytes(b"the user's old file")
    assert cli.convert_main([f"--checkpoint={workdir}", "--export", f"--out={official}", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert err.count("No space left on device") == 2 and "Traceback" not in err, err
    assert os.listdir(disk) == ["model.safetensors"] and official.read_bytes() == b"the user's old file"


# ----------------------------------------------------------------------------------------------------
# Reading a transformers folder trusts no size in config.json (issue 24, case 7)


def hostile_folder(exported, tmp_path, name: str, changes: dict, remove: tuple = ()) -> str:
  """A copy of the exported `name` folder whose config.json has `changes` and lacks the keys `remove`."""
  source = exported[name][2]
  folder = tmp_path / f"{name}_hostile"
  folder.mkdir()
  config = json.loads(open(os.path.join(source, "config.json")).read())
  config.update(changes)
  for key in remove:
    del config[key]
  (folder / "config.json").write_text(json.dumps(config))
  os.symlink(os.path.join(source, "model.safetensors"), folder / "model.safetensors")
  return str(folder)


HOSTILE_CONFIGS = {  # name: (exported folder, changes, keys removed, what the one-line refusal says)
    "grid_7_6_gb": ("beit_mim", {"image_size": 512}, (), "a 128x128 patch grid, more than the 64x64"),
    "grid_0_5_gb": ("beit_mim", {"image_size": 256}, (), "would build ~537 MB of position tables for a weights file"),
    "grid_of_other_weights": ("beit_mim", {"image_size": 64}, (), "relative_position_bias_table is [228, 2], but "
                                                                  "config.json describes [964, 2]"),
    "ten_million_layers": ("vit_mim", {"num_hidden_layers": 10 ** 7}, (),
                           "num_hidden_layers=10000000 is not an integer in [1, 256]"),
    "more_layers_than_the_weights": ("vit_mim", {"num_hidden_layers": 3}, (), "the weights hold 2 layers"),
    "string_size": ("vit_mim", {"hidden_size": "32"}, (), "hidden_size='32' is not an integer in [1, 16384]"),
    "bool_size": ("swin_mim", {"embed_dim": True}, (), "embed_dim=True is not an integer"),
    "missing_key": ("vit_mim", {}, ("patch_size",), "no 'patch_size'; a transformers vit config.json has it"),
    "nan_eps": ("vit_mim", {"layer_norm_eps": float("nan")}, (), "layer_norm_eps=nan is not a number in (0.0, 1.0]"),
    "wider_than_the_weights": ("vit_mim", {"hidden_size": 64, "intermediate_size": 256}, (),
                               "patch_embeddings.projection.weight is [32, 3, 4, 4], but config.json describes "
                               "[64, 3, 4, 4]"),
    "mlp_wider_than_the_weights": ("vit_mim", {"intermediate_size": 999}, (), "intermediate.dense.weight is"),
    "swin_window": ("swin_mim", {"window_size": 8}, (), "relative_position_bias_table is [49, 1], but config.json "
                                                        "describes [225, 1]"),
    "swin_depths": ("swin_mim", {"depths": [2, 3]}, (), "the weights hold [2, 2] blocks per stage"),
    "swin_heads_list": ("swin_mim", {"num_heads": "1,2"}, (), "num_heads='1,2' is not a list of 1 to 8 integers"),
    "swinv2_masks": ("swinv2_mim", {"image_size": 2048, "window_size": 16}, (),
                     "would build ~1,409 MB of position tables for a weights file of"),
    "unknown_type": ("vit_mim", {"model_type": "deit"}, (), "model_type='deit' is not one of"),
}


@pytest.mark.parametrize("case", list(HOSTILE_CONFIGS))
def test_a_config_json_whose_sizes_are_hostile_or_wrong_is_one_line_before_any_allocation(exported, tmp_path, case):
  name, changes, remove, message = HOSTILE_CONFIGS[case]
  folder = hostile_folder(exported, tmp_path, name, changes, remove)
  tracemalloc.start()  # numpy's buffers are traced: the position tables would be
  with pytest.raises(ValueError) as error:
    hf_export.from_hf(folder)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 20 << 20, f"{peak / 2 ** 20:.0f} MB"  # without the checks: 0.5 GB (grid_0_5_gb) to 7.6 GB
  assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
  assert str(error.value).startswith(folder)


def test_a_config_json_that_is_not_a_json_object_or_a_regular_file_is_refused(exported, tmp_path):
  folder = hostile_folder(exported, tmp_path, "vit_mim", {})
  (tmp_path / "vit_mim_hostile" / "config.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="config.json: expected a JSON object, found a JSON list"):
    hf_export.from_hf(folder)
  (tmp_path / "vit_mim_hostile" / "config.json").unlink()
  os.mkfifo(tmp_path / "vit_mim_hostile" / "config.json")  # a FIFO is never opened for reading
  with pytest.raises(ValueError, match=r"config.json' is a FIFO \(named pipe\), not a regular file"):
    hf_export.from_hf(folder)


def test_convert_names_a_transformers_folder_given_as_a_checkpoint_and_what_to_pass(exported, tmp_path, capsys):
  folder = exported["vit_mim"][2]
  assert cli.convert_main([f"--checkpoint={folder}", "--encoder=vit_test_tiny_plain",
                           f"--out={tmp_path / 'x.npz'}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "does not exist" not in err, err
  assert (f"{folder} is a folder (a Hugging Face transformers model: config.json + model.safetensors), not a "
          f"weight file: give its weights file, {os.path.join(folder, 'model.safetensors')}") in err
  assert cli.convert_main([f"--checkpoint={os.path.join(folder, 'model.safetensors')}",
                           "--encoder=vit_test_tiny_plain", f"--out={tmp_path / 'x.npz'}"]) == 0
