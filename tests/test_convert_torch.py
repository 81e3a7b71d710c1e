"""Parity with PyTorch models written by others (Hugging Face transformers 4.x, random weights, small configs):
convert their state dicts, run both on the same images and masks, compare in float32 (max abs diff <= 1e-4).

The PyTorch side (`torch_reference.py`) runs once per module in the interpreter named by $SIMMIM_TORCH_PYTHON
(a Python 3.11 venv with torch 2.13 CPU and transformers 4.57; `.ci/run` creates it).
"""

import os
import pathlib

import jax
import numpy as np
import pytest

from simmim_jax.storage import convert, torch_files
from simmim_jax import masking, models
from helpers import run_process

TOLERANCE = 1e-4
TORCH_PYTHON = os.environ.get("SIMMIM_TORCH_PYTHON")
pytestmark = pytest.mark.skipif(
    not TORCH_PYTHON, reason="SIMMIM_TORCH_PYTHON is unset: no PyTorch interpreter for the parity tests "
    "(.ci/run creates .venv-torch with torch==2.13.0 transformers==4.57.6 and sets it)")
SCRIPT = pathlib.Path(__file__).with_name("torch_reference.py")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Runs every PyTorch model once; returns (images, mask, output directory)."""
  out_dir = tmp_path_factory.mktemp("torch")
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  mask = np.asarray(masking.random_mask(jax.random.key(0), 2, input_size=32, mask_patch_size=8,
                                        model_patch_size=4, mask_ratio=0.6))  # [2, 8, 8]
  encoder = models.create_encoder("vit_test_tiny")
  model = models.SimMIM(encoder=encoder, encoder_stride=encoder.output_stride)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), convert.abstract_params(model))
  exported = convert.to_torch(model, {"params": params})
  write_check = str(out_dir / "simmim_jax_written.safetensors")
  torch_files.write_safetensors(write_check, exported)
  np.savez(out_dir / "inputs.npz", images=images, mask=mask, write_check=np.array(write_check))
  result = run_process([TORCH_PYTHON, SCRIPT, out_dir / "inputs.npz", out_dir])
  assert result.returncode == 0, result.stderr[-4000:]
  return images, mask, out_dir, exported


def load(out_dir, name):
  data = np.load(out_dir / f"{name}.npz")
  state_dict = {k[len("sd/"):]: data[k] for k in data.files if k.startswith("sd/")}
  outputs = {k[len("out/"):]: data[k] for k in data.files if k.startswith("out/")}
  return state_dict, outputs


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("name, encoder, overrides", [
    ("hf_vit", "vit_test_tiny_plain", {}),                                   # ViTForMaskedImageModeling
    ("hf_swin", "swin_test_tiny", dict(depths=(2, 2), num_heads=(1, 2))),    # SwinForMaskedImageModeling
    ("hf_swinv2", "swinv2_test_tiny", {}),                                   # Swinv2ForMaskedImageModeling
    ("beit_simmim", "vit_test_tiny", {}),                                    # official ViT as HF BeitModel
])
def test_simmim_reconstruction_and_loss_match_pytorch(reference, name, encoder, overrides):
  images, mask, out_dir, _ = reference
  state_dict, expected = load(out_dir, name)
  model, variables = convert.from_torch(state_dict, encoder=encoder, **overrides)
  assert isinstance(model, models.SimMIM)
  out = jax.jit(model.apply)(variables, images, mask)
  assert out["reconstruction"].shape == expected["reconstruction"].shape == images.shape
  assert max_diff(out["reconstruction"], expected["reconstruction"]) <= TOLERANCE
  assert max_diff(out["loss"], expected["loss"]) <= TOLERANCE


def test_official_style_vit_encoder_matches_hf_beit_model(reference):
  """Shared relative position bias, layer scale, q/v bias, mask token: every token of BeitModel's output."""
  images, mask, out_dir, _ = reference
  state_dict, expected = load(out_dir, "beit_simmim")
  model, variables = convert.from_torch(state_dict, encoder="vit_test_tiny")
  encoder = model.encoder
  assert encoder.use_shared_rel_pos_bias and not encoder.use_abs_pos_emb and encoder.layer_scale_init is not None
  out = encoder.apply({"params": variables["params"]["encoder"]}, images, mask)
  hidden = expected["last_hidden_state"]  # [B, 1 + N, D]
  assert max_diff(out["pooled"], hidden[:, 0]) <= TOLERANCE
  assert max_diff(out["feature_map"].reshape(hidden[:, 1:].shape), hidden[:, 1:]) <= TOLERANCE


def test_official_finetune_vit_layout_matches_hf_beit_classifier(reference):
  """Per-block relative position bias + mean pooling + fc_norm + head, as the official fine-tune ViT."""
  images, _, out_dir, _ = reference
  state_dict, expected = load(out_dir, "beit_classifier")
  model, variables = convert.from_torch(state_dict, encoder="vit_test_tiny")
  assert model.encoder.use_rel_pos_bias and model.encoder.use_mean_pooling
  assert max_diff(model.apply(variables, images), expected["logits"]) <= TOLERANCE


def test_hf_checkpoint_exports_to_official_format_and_back(reference):
  _, _, out_dir, _ = reference
  state_dict, _ = load(out_dir, "hf_swinv2")
  model, variables = convert.from_torch(state_dict, encoder="swinv2_test_tiny")
  official = convert.to_torch(model, variables)
  assert convert.detect_format(official) == "official"
  again_model, again = convert.from_torch(official, encoder="swinv2_test_tiny")
  assert again_model == model
  assert jax.tree.all(jax.tree.map(np.array_equal, again, variables))


def test_torch_save_files_are_read_without_torch(reference):
  """Views, offsets, bf16 / fp16 / int64 / bool, 0-d and empty tensors, parameters: values and dtypes."""
  _, _, out_dir, _ = reference
  tensors = torch_files.load_state_dict(str(out_dir / "tensors.pth"))
  expected = np.load(out_dir / "tensors.npz")
  assert sorted(tensors) == sorted(expected.files)
  assert tensors["bf16"].dtype.name == "bfloat16" and tensors["int64"].dtype == np.int64
  for key in expected.files:
    assert tensors[key].shape == expected[key].shape, key
    np.testing.assert_array_equal(np.asarray(tensors[key], expected[key].dtype), expected[key])


def test_training_checkpoint_weights_are_read_and_metadata_skipped(reference):
  _, _, out_dir, _ = reference
  state_dict = torch_files.load_state_dict(str(out_dir / "checkpoint.pth"))  # {"model", "optimizer", "config"...}
  expected, _ = load(out_dir, "checkpoint")
  assert sorted(state_dict) == sorted(expected)
  assert all(state_dict[k].dtype == expected[k].dtype and np.array_equal(state_dict[k], expected[k])
             for k in expected)


def test_safetensors_files_from_the_safetensors_package_are_read(reference):
  _, _, out_dir, _ = reference
  state_dict = torch_files.load_state_dict(str(out_dir / "swinv2.safetensors"))
  expected, _ = load(out_dir, "hf_swinv2")
  assert sorted(state_dict) == sorted(expected)
  assert all(np.array_equal(state_dict[k], expected[k]) for k in expected)


def test_exported_safetensors_load_in_pytorch(reference):
  _, _, out_dir, exported = reference
  loaded = dict(np.load(out_dir / "write_check.npz"))
  assert sorted(loaded) == sorted(exported)
  assert all(loaded[k].dtype == exported[k].dtype and loaded[k].tobytes() == exported[k].tobytes()
             for k in exported)
