"""simmim_jax.storage.convert and torch_files without PyTorch: official-format round trips, key sets of the released
models, refusals, safe reading of pickles, safetensors, and converted simmim-pretrain workdirs."""

import json
import os
import pickle
import sys
import types
import zipfile

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from simmim_jax import cli, models
from simmim_jax.storage import convert, torch_files
from simmim_jax.configs import default_config
from simmim_jax.storage import workdir as workdir_lib
from simmim_jax.models.classifier import Classifier
from helpers import PRETRAIN, full_disk, run_process, snapshot

SWIN_TWO_STAGES = dict(depths=(2, 2), num_heads=(1, 2))


def random_variables(model, seed=0):
  rng = np.random.default_rng(seed)
  params = convert.abstract_params(model)
  return {"params": jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), params)}


def simmim(name, **overrides):
  encoder = models.create_encoder(name, **overrides)
  return models.SimMIM(encoder=encoder, encoder_stride=encoder.output_stride)


def classifier(name, **overrides):
  return Classifier(encoder=models.create_encoder(name, **overrides), num_classes=5)


ROUND_TRIP_CASES = {
    "vit_pretrain": ("vit_test_tiny", simmim("vit_test_tiny")),
    "vit_finetune": ("vit_test_tiny", classifier("vit_test_tiny", use_mean_pooling=True, use_rel_pos_bias=True,
                                                 use_shared_rel_pos_bias=False)),
    "vit_plain": ("vit_test_tiny_plain", simmim("vit_test_tiny_plain")),
    "swin_pretrain": ("swin_test_tiny", simmim("swin_test_tiny")),
    "swin_finetune": ("swin_test_tiny", classifier("swin_test_tiny")),
    "swinv2_pretrain": ("swinv2_test_tiny", simmim("swinv2_test_tiny", pretrained_window_sizes=(4, 4, 2))),
    "vit_encoder_only": ("vit_test_tiny", models.create_encoder("vit_test_tiny", use_mean_pooling=True)),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIP_CASES))
def test_official_state_dict_round_trips_bit_exactly(case):
  name, model = ROUND_TRIP_CASES[case]
  official = convert.to_torch(model, random_variables(model))
  overrides = {"pretrained_window_sizes": (4, 4, 2)} if "swinv2" in case else {}
  converted_model, variables = convert.from_torch(official, encoder=name, **overrides)
  assert type(converted_model) is type(model)
  assert (converted_model.encoder if hasattr(converted_model, "encoder") else converted_model) == (
      model.encoder if hasattr(model, "encoder") else model)  # every layout field inferred from the keys
  again = convert.to_torch(converted_model, variables)
  assert sorted(again) == sorted(official)
  for key, value in official.items():
    assert again[key].dtype == value.dtype and again[key].shape == value.shape, key
    assert again[key].tobytes() == value.tobytes(), key


def test_export_matches_the_official_vit_base_key_set():
  """190 entries, names and shapes of microsoft/SimMIM's ViT-B pretraining model (`models/simmim.py` build_simmim)."""
  model = simmim("vit_base_patch16")
  variables = {"params": jax.tree.map(lambda s: np.zeros(s.shape, np.float32), convert.abstract_params(model))}
  shapes = {k: v.shape for k, v in convert.to_torch(model, variables).items()}
  per_block = {"gamma_1": (768,), "gamma_2": (768,), "norm1.weight": (768,), "norm1.bias": (768,),
               "attn.q_bias": (768,), "attn.v_bias": (768,), "attn.qkv.weight": (2304, 768),
               "attn.proj.weight": (768, 768), "attn.proj.bias": (768,), "norm2.weight": (768,),
               "norm2.bias": (768,), "mlp.fc1.weight": (3072, 768), "mlp.fc1.bias": (3072,),
               "mlp.fc2.weight": (768, 3072), "mlp.fc2.bias": (768,)}
  expected = {"encoder.cls_token": (1, 1, 768), "encoder.mask_token": (1, 1, 768),
              "encoder.patch_embed.proj.weight": (768, 3, 16, 16), "encoder.patch_embed.proj.bias": (768,),
              "encoder.rel_pos_bias.relative_position_bias_table": (732, 12),
              "encoder.rel_pos_bias.relative_position_index": (197, 197), "encoder.norm.weight": (768,),
              "encoder.norm.bias": (768,), "decoder.0.weight": (768, 768, 1, 1), "decoder.0.bias": (768,)}
  expected.update({f"encoder.blocks.{i}.{k}": v for i in range(12) for k, v in per_block.items()})
  assert len(expected) == 190
  assert shapes == expected


def test_export_matches_the_official_swin_base_buffers_and_tables():
  """Swin-B 192/w6: 365 entries; tables (121, heads), index (36, 36), attn_mask only in shifted blocks."""
  model = simmim("swin_base_patch4_window6")
  variables = {"params": jax.tree.map(lambda s: np.zeros(s.shape, np.float32), convert.abstract_params(model))}
  state_dict = convert.to_torch(model, variables)
  assert len(state_dict) == 365
  masks = {k: v.shape for k, v in state_dict.items() if k.endswith("attn_mask")}
  assert masks == {"encoder.layers.0.blocks.1.attn_mask": (64, 36, 36), "encoder.layers.1.blocks.1.attn_mask":
                   (16, 36, 36), **{f"encoder.layers.2.blocks.{j}.attn_mask": (4, 36, 36) for j in range(1, 18, 2)}}
  assert state_dict["encoder.layers.3.blocks.0.attn.relative_position_bias_table"].shape == (121, 32)
  assert state_dict["encoder.layers.2.downsample.reduction.weight"].shape == (1024, 2048)
  assert state_dict["decoder.0.weight"].shape == (3072, 1024, 1, 1)
  assert state_dict["encoder.layers.0.blocks.0.attn.relative_position_index"].dtype == np.int64


def test_linear_and_conv_weights_are_transposed_explicitly():
  model = simmim("swin_test_tiny")
  official = convert.to_torch(model, random_variables(model))
  _, variables = convert.from_torch(official, encoder="swin_test_tiny")
  params = variables["params"]
  np.testing.assert_array_equal(params["encoder"]["layers_0"]["blocks_0"]["attn"]["qkv"]["kernel"],
                                official["encoder.layers.0.blocks.0.attn.qkv.weight"].T)
  np.testing.assert_array_equal(params["encoder"]["patch_embed"]["proj"]["kernel"],
                                official["encoder.patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["decoder"]["kernel"], official["decoder.0.weight"][:, :, 0, 0].T)


def test_buffers_are_recomputed_not_loaded():
  model = simmim("swin_test_tiny")
  official = convert.to_torch(model, random_variables(model))
  tampered = {k: (np.full_like(v, 7) if k.endswith(("relative_position_index", "attn_mask")) else v)
              for k, v in official.items()}
  without = {k: v for k, v in official.items() if not k.endswith(("relative_position_index", "attn_mask"))}
  _, reference = convert.from_torch(official, encoder="swin_test_tiny")
  for state_dict in (tampered, without):
    _, variables = convert.from_torch(state_dict, encoder="swin_test_tiny")
    assert jax.tree.all(jax.tree.map(np.array_equal, variables, reference))


def test_unknown_missing_and_mismatched_keys_are_listed_by_name():
  model = simmim("vit_test_tiny")
  official = convert.to_torch(model, random_variables(model))
  broken = dict(official)
  broken["encoder.blocks.0.attn.extra_weight"] = np.zeros(3, np.float32)
  del broken["encoder.blocks.1.mlp.fc2.bias"]
  broken["encoder.blocks.0.mlp.fc1.weight"] = np.zeros((7, 32), np.float32)
  with pytest.raises(convert.ConversionError) as error:
    convert.from_torch(broken, encoder="vit_test_tiny")
  message = str(error.value)
  assert "unexpected keys" in message and "encoder.blocks.0.attn.extra_weight" in message
  assert "missing keys" in message and "encoder.blocks.1.mlp.fc2.bias" in message
  assert "shape mismatches" in message and "encoder.blocks.0.mlp.fc1.weight" in message


def test_sizes_come_from_the_name_and_a_mismatch_is_refused():
  model = simmim("vit_test_tiny")
  official = convert.to_torch(model, random_variables(model))
  with pytest.raises(convert.ConversionError, match="shape mismatches"):
    convert.from_torch(official, encoder="vit_test_tiny", embed_dim=64)
  with pytest.raises(convert.ConversionError, match="holds a vit encoder"):
    convert.from_torch(official, encoder="swin_test_tiny")


@pytest.mark.parametrize("keys, expected", [
    (["encoder.blocks.0.attn.qkv.weight", "decoder.0.weight"], "official"),
    (["layers.0.blocks.0.attn.qkv.weight", "head.weight"], "official"),
    (["vit.encoder.layer.0.attention.attention.query.weight", "vit.embeddings.position_embeddings"], "hf_vit"),
    (["encoder.layer.0.attention.attention.query.weight", "encoder.layer.0.lambda_1"], "hf_beit"),
    (["swin.encoder.layers.0.blocks.0.attention.self.query.weight"], "hf_swin"),
    (["swinv2.encoder.layers.0.blocks.0.attention.self.continuous_position_bias_mlp.0.weight"], "hf_swinv2"),
])
def test_format_is_detected_from_the_keys(keys, expected):
  assert convert.detect_format(keys) == expected


def test_hf_keys_are_renamed_and_qkv_fused():
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((4, 4)).astype(np.float32) for _ in range(3))
  hf = {"swinv2.encoder.layers.0.blocks.0.attention.self.query.weight": q,
        "swinv2.encoder.layers.0.blocks.0.attention.self.key.weight": k,
        "swinv2.encoder.layers.0.blocks.0.attention.self.value.weight": v,
        "swinv2.encoder.layers.0.blocks.0.attention.self.query.bias": q[0],
        "swinv2.encoder.layers.0.blocks.0.attention.self.value.bias": v[0],
        "decoder.0.bias": q[1]}
  official, fmt = convert.to_official_keys(hf)
  assert fmt == "hf_swinv2"
  np.testing.assert_array_equal(official["encoder.layers.0.blocks.0.attn.qkv.weight"], np.concatenate([q, k, v]))
  np.testing.assert_array_equal(official["encoder.layers.0.blocks.0.attn.q_bias"], q[0])
  np.testing.assert_array_equal(official["encoder.layers.0.blocks.0.attn.v_bias"], v[0])
  assert sorted(official) == ["decoder.0.bias", "encoder.layers.0.blocks.0.attn.q_bias",
                              "encoder.layers.0.blocks.0.attn.qkv.weight", "encoder.layers.0.blocks.0.attn.v_bias"]


def test_released_swinv2_rpe_mlp_name_is_accepted():
  model = simmim("swinv2_test_tiny")
  official = convert.to_torch(model, random_variables(model))
  released = {k.replace(".cpb_mlp.", ".rpe_mlp."): v for k, v in official.items()}
  _, variables = convert.from_torch(released, encoder="swinv2_test_tiny")
  _, reference = convert.from_torch(official, encoder="swinv2_test_tiny")
  assert jax.tree.all(jax.tree.map(np.array_equal, variables, reference))


# ----------------------------------------------------------------------------------------------------
# Reading files safely


class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def write_torch_zip(path, obj, storages=None):
  """A file in torch.save's zip layout whose data.pkl is `pickle.dumps(obj)`."""
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
    archive.writestr("archive/byteorder", "little")
    for key, data in (storages or {}).items():
      archive.writestr(f"archive/data/{key}", data)


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  write_torch_zip(path, {"model": {"w": _Payload(marker)}})
  assert not marker.exists()
  with pytest.raises(torch_files.UnsafeCheckpointError, match="system"):
    torch_files.load_state_dict(str(path))
  assert not marker.exists()


def test_a_plain_pickle_file_is_refused_without_running_it(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  path.write_bytes(pickle.dumps({"model": _Payload(marker)}))
  with pytest.raises(ValueError, match="not a torch.save zip archive"):
    torch_files.load_state_dict(str(path))
  assert not marker.exists()


class _TensorStub:
  """Pickles as torch does: _rebuild_tensor_v2(('storage', FloatStorage, key, 'cpu', n), offset, size, stride)."""

  def __init__(self, key, offset, size, stride):
    self.args = (key, offset, size, stride)

  def __reduce__(self):
    return (_rebuild_tensor_v2, (_StoragePid(self.args[0]),) + self.args[1:] + (False, {}))


class _StoragePid:
  def __init__(self, key):
    self.key = key


def _rebuild_tensor_v2(*args):
  raise AssertionError("never called: the stub only shapes the pickle")


def _official_checkpoint_pickle(monkeypatch, config_factory) -> bytes:
  """Pickles {"model": {"w": tensor}, "config": yacs CfgNode, "epoch": 99} the way torch.save does, with
  stand-ins for the torch / yacs globals registered only while pickling."""
  import io  # pylint: disable=g-import-not-at-top

  float_storage = type("FloatStorage", (), {"__module__": "torch"})
  _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      return ("storage", float_storage, obj.key, "cpu", 6) if isinstance(obj, _StoragePid) else None

  with monkeypatch.context() as patch:
    fakes = {"torch": {"FloatStorage": float_storage}, "torch._utils": {"_rebuild_tensor_v2": _rebuild_tensor_v2},
             "yacs": {}, "yacs.config": {}}
    for name, attributes in fakes.items():
      module = types.ModuleType(name)
      module.__dict__.update(attributes)
      patch.setitem(sys.modules, name, module)
    config_class = config_factory()
    sys.modules["yacs.config"].CfgNode = config_class
    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump({"model": {"w": _TensorStub("0", 1, (2, 2), (1, 2))},
                                      "config": config_class(MODEL=config_class(TYPE="swin")), "epoch": 99})
  return buffer.getvalue()


def test_official_checkpoint_with_a_pickled_config_reads_the_weights(tmp_path, monkeypatch):
  """The official .pth files pickle a yacs CfgNode next to the weights: skipped, never constructed."""
  constructed = []

  def config_factory():
    class CfgNode(dict):
      def __init__(self, *args, **kwargs):
        constructed.append(1)
        super().__init__(*args, **kwargs)

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    return CfgNode

  data = _official_checkpoint_pickle(monkeypatch, config_factory)
  constructed.clear()
  path = tmp_path / "official.pth"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", data)
    archive.writestr("archive/data/0", np.arange(6, dtype=np.float32).tobytes())
  state_dict = torch_files.load_state_dict(str(path))
  assert not constructed
  assert list(state_dict) == ["w"]
  # offset 1, size (2, 2), stride (1, 2): elements [[1, 3], [2, 4]] of the storage 0..5
  np.testing.assert_array_equal(state_dict["w"], np.array([[1, 3], [2, 4]], np.float32))


def test_safetensors_round_trip(tmp_path):
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int64),
            "c": np.ones((0, 2), np.float16)}
  path = str(tmp_path / "x.safetensors")
  torch_files.write_safetensors(path, arrays)
  loaded = torch_files.load_state_dict(path)
  assert sorted(loaded) == sorted(arrays)
  for key, value in arrays.items():
    assert loaded[key].dtype == value.dtype and np.array_equal(loaded[key], value)


def test_missing_checkpoint_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothere.pth"):
    torch_files.load_state_dict(str(tmp_path / "nothere.pth"))


# ----------------------------------------------------------------------------------------------------
# simmim-pretrain workdirs


@pytest.fixture(scope="module")
def converted_workdir(tmp_path_factory):
  model = simmim("vit_test_tiny")
  official = convert.to_torch(model, random_variables(model, seed=3))
  path = str(tmp_path_factory.mktemp("ckpt") / "simmim_vit.npz")
  np.savez(path, **official)
  workdir = str(tmp_path_factory.mktemp("converted") / "run")
  assert cli.convert_main([f"--checkpoint={path}", "--encoder=vit_test_tiny", f"--workdir={workdir}"]) == 0
  return workdir, official


def test_converted_workdir_loads_with_checkpoint_load_model(converted_workdir):
  workdir, official = converted_workdir
  model, variables, config = workdir_lib.load_model(workdir)
  assert config.model.name == "vit_test_tiny"
  exported = convert.to_torch(model, variables)
  assert sorted(exported) == sorted(official)
  assert all(np.array_equal(exported[k], official[k]) for k in official)


def test_converted_workdir_feeds_finetuning(converted_workdir):
  from simmim_jax.train import downstream  # pylint: disable=g-import-not-at-top

  workdir, official = converted_workdir
  encoder = downstream.load_pretrained_encoder_params(ml_collections.ConfigDict(
      {"pretrained": workdir, "pretrained_step": 0}))
  np.testing.assert_array_equal(encoder["blocks_1"]["attn"]["qkv"]["kernel"],
                                official["encoder.blocks.1.attn.qkv.weight"].T)


def test_export_cli_writes_the_official_state_dict(converted_workdir, tmp_path):
  workdir, official = converted_workdir
  out = str(tmp_path / "exported.safetensors")
  assert cli.convert_main([f"--checkpoint={workdir}", "--export", f"--out={out}"]) == 0
  exported = torch_files.load_state_dict(out)
  assert sorted(exported) == sorted(official)
  assert all(exported[k].tobytes() == official[k].tobytes() for k in official)


def test_convert_cli_reports_errors_with_the_file_name(tmp_path, capsys):
  assert cli.convert_main([f"--checkpoint={tmp_path}/missing.pth", "--encoder=vit_test_tiny",
                           f"--workdir={tmp_path}/w"]) == 2
  assert "missing.pth" in capsys.readouterr().err


def test_workdir_needs_a_simmim_checkpoint(tmp_path):
  model = classifier("vit_test_tiny", use_mean_pooling=True)
  with pytest.raises(convert.ConversionError, match="only a SimMIM"):
    convert.save_workdir(str(tmp_path / "w"), model, random_variables(model), encoder="vit_test_tiny",
                         overrides={})


def test_flat_params_npz_output(tmp_path):
  model = simmim("swin_test_tiny")
  official = convert.to_torch(model, random_variables(model))
  src, out = str(tmp_path / "in.npz"), str(tmp_path / "params.npz")
  np.savez(src, **official)
  assert cli.convert_main([f"--checkpoint={src}", "--encoder=swin_test_tiny", f"--out={out}"]) == 0
  flat = dict(np.load(out))
  _, variables = convert.from_torch(official, encoder="swin_test_tiny")
  expected = traverse_util.flatten_dict(variables["params"], sep="/")
  assert sorted(flat) == sorted(expected)
  assert all(np.array_equal(flat[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_simmim_pretrain_continues_from_a_converted_workdir(tmp_path):
  """simmim-convert --config=C --workdir=W, then simmim-pretrain --config=C --workdir=W starts from the weights."""
  from simmim_jax import configs  # pylint: disable=g-import-not-at-top
  from simmim_jax.train import pretrain

  config = configs.load("demo")
  model = pretrain.build_model(config)
  source = str(tmp_path / "official.npz")
  np.savez(source, **convert.to_torch(model, random_variables(model, seed=5)))
  workdir = str(tmp_path / "w")
  assert cli.convert_main([f"--checkpoint={source}", "--config=demo", f"--workdir={workdir}"]) == 0
  result = run_process([*PRETRAIN, "--config=demo", f"--workdir={workdir}", "--config.total_steps=1",
                        "--config.global_batch_size=8", "--config.data.num_demo_images=16"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Starting from the converted weights" in result.stdout


# ----------------------------------------------------------------------------------------------------
# Conversion never overwrites what it did not create; exports are atomic


@pytest.fixture
def official_npz(tmp_path):
  model = simmim("vit_test_tiny")
  path = tmp_path / "simmim_vit.npz"
  np.savez(path, **convert.to_torch(model, random_variables(model, seed=3)))
  return str(path)


def convert_cli(checkpoint, *flags):
  return cli.convert_main([f"--checkpoint={checkpoint}", "--encoder=vit_test_tiny", *flags])


def fill_folder(folder, holds, checkpoint):
  """A folder that --workdir must not write into."""
  folder.mkdir()
  if holds == "hf_export":  # a Hugging Face model folder
    (folder / "config.json").write_text(json.dumps({"architectures": ["ViTForMaskedImageModeling"],
                                                    "model_type": "vit", "hidden_size": 32}))
    (folder / "model.safetensors").write_bytes(b"the weights")
  elif holds == "own_config":  # the user's own config.json
    (folder / "config.json").write_text('{"learning_rate": 0.1}\n')
  elif holds == "other_model":  # a simmim_jax workdir of another model, without checkpoints
    workdir_lib.write_config(str(folder), default_config.get_config(), recipe="pretrain")
  elif holds == "finetune_workdir":  # a simmim-finetune workdir of the same encoder, without checkpoints
    config = default_config.get_config()
    config.model = ml_collections.ConfigDict({"name": "vit_test_tiny"})
    workdir_lib.write_config(str(folder), config, recipe="finetune")
  elif holds == "checkpoints":  # a finished conversion of the same model
    folder.rmdir()
    assert convert_cli(checkpoint, f"--workdir={folder}") == 0
  elif holds == "other_files":
    (folder / "notes.txt").write_text("mine")


@pytest.mark.parametrize("holds", ["hf_export", "own_config", "other_model", "finetune_workdir", "checkpoints",
                                   "other_files"])
def test_convert_workdir_refuses_a_folder_it_did_not_create_before_writing_anything(tmp_path, official_npz, capsys,
                                                                                   holds):
  folder = tmp_path / "target"
  fill_folder(folder, holds, official_npz)
  before = snapshot(folder)
  capsys.readouterr()
  out = tmp_path / "params.npz"
  assert convert_cli(official_npz, f"--workdir={folder}", f"--out={out}") == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and f"--workdir={folder}" in err, err
  assert snapshot(folder) == before and not out.exists()  # --out is checked first too: nothing written


def test_convert_workdir_writes_a_new_an_empty_or_an_unfinished_workdir_of_the_same_model(tmp_path, official_npz):
  (tmp_path / "empty").mkdir()
  assert convert_cli(official_npz, f"--workdir={tmp_path / 'new'}") == 0
  assert convert_cli(official_npz, f"--workdir={tmp_path / 'empty'}") == 0
  unfinished = tmp_path / "unfinished"  # what a conversion killed before its checkpoint leaves
  unfinished.mkdir()
  (unfinished / "config.json").write_bytes((tmp_path / "new" / "config.json").read_bytes())
  (unfinished / "run.lock").write_text("")
  assert convert_cli(official_npz, f"--workdir={unfinished}") == 0
  for name in ("new", "empty", "unfinished"):
    _, _, config = workdir_lib.load_model(str(tmp_path / name))
    assert config.model.name == "vit_test_tiny" and workdir_lib.recipe_of(config) == "convert"


def test_export_refuses_an_existing_file_unless_overwrite(converted_workdir, tmp_path, capsys):
  workdir, official = converted_workdir
  out = tmp_path / "model.safetensors"
  out.write_bytes(b"the user's file")
  assert cli.convert_main([f"--checkpoint={workdir}", "--export", f"--out={out}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "exists: pass --overwrite" in err, err
  assert out.read_bytes() == b"the user's file"
  assert cli.convert_main([f"--checkpoint={workdir}", "--export", f"--out={out}", "--overwrite"]) == 0
  assert sorted(torch_files.load_state_dict(str(out))) == sorted(official) and os.listdir(tmp_path) == [out.name]


def test_a_full_disk_during_an_export_keeps_the_old_file_and_is_exit_1(converted_workdir, tmp_path, capsys,
                                                                       monkeypatch):
  workdir, _ = converted_workdir
  for name in ("model.safetensors", "model.npz"):
    out = tmp_path / name
    out.write_bytes(b"the user's file")
    with monkeypatch.context() as patch:
      full_disk(patch, after_bytes=1000)
      assert cli.convert_main([f"--checkpoint={workdir}", "--export", f"--out={out}", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stopped: cannot write" in err and "No space left on device" in err, err
    assert out.read_bytes() == b"the user's file"
  assert sorted(os.listdir(tmp_path)) == ["model.npz", "model.safetensors"]  # no temporary file left


def test_export_to_an_existing_folder_is_exit_2_in_one_line(converted_workdir, tmp_path, capsys):
  workdir, _ = converted_workdir
  (tmp_path / "model.safetensors").mkdir()
  for extra in ([], ["--overwrite"]):
    assert cli.convert_main([f"--checkpoint={workdir}", "--export", f"--out={tmp_path / 'model.safetensors'}",
                             *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a folder" in err, err
  assert os.listdir(tmp_path / "model.safetensors") == []
