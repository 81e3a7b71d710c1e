"""The encoders' `scan_blocks` field (models/layers.py `scan_blocks`): identical blocks run as one `jax.lax.scan`
and compute what the unrolled blocks compute, with the same parameter tree, so every reader and writer of
parameters (checkpoints, resume, simmim-convert, HF export, workdir.load_model) works with either setting.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simmim_jax import cli, masking, models
from simmim_jax.storage import convert, hf_export, torch_files
from simmim_jax.storage import workdir as workdir_lib
from simmim_jax.models import layers

# Odd depths: a block is left over after the scan (Swin scans pairs of unshifted + shifted blocks).
TINY = {
    "vit": ("vit_test_tiny", dict(depth=3, use_rel_pos_bias=True)),  # shared + per-block relative position tables
    "vit_plain": ("vit_test_tiny_plain", dict(depth=2)),
    "swin": ("swin_test_tiny", dict(depths=(3, 1), num_heads=(1, 2))),  # 8x8 shifted windows, then 4x4 = one window
    "swinv2": ("swinv2_test_tiny", dict(depths=(2, 1), num_heads=(1, 2), pretrained_window_sizes=(3, 0))),
}


def simmim(name, **fields):
  encoder = models.create_encoder(name, **fields)
  return models.SimMIM(encoder=encoder, encoder_stride=encoder.output_stride)


def batch(seed=0):
  images = jax.random.normal(jax.random.key(seed), (2, 32, 32, 3))
  mask = masking.random_mask(jax.random.key(seed + 1), batch_size=2, input_size=32, mask_patch_size=8,
                             model_patch_size=4, mask_ratio=0.6)
  return images, mask


def loss_and_grads(model, params, images, mask):
  return jax.jit(jax.value_and_grad(lambda p: model.apply({"params": p}, images, mask)["loss"]))(params)


# One case per family in the default suite (remat on one of them); every combination with the long checks.
DEFAULT_CASES = [("vit", True)]  # one tiny model in the default suite; every family and remat setting under slow
ALL_CASES = [pytest.param(case, remat, marks=pytest.mark.slow) for case in TINY for remat in (False, True)
             if (case, remat) not in DEFAULT_CASES]


@pytest.mark.parametrize("case, remat", DEFAULT_CASES + ALL_CASES)
def test_scanned_blocks_equal_the_unrolled_blocks_in_loss_and_gradients(case, remat):
  name, fields = TINY[case]
  unrolled = simmim(name, remat=remat, drop_path_rate=0.1, **fields)
  scanned = simmim(name, remat=remat, drop_path_rate=0.1, scan_blocks=True, **fields)
  images, mask = batch()
  variables = unrolled.init(jax.random.key(0), images, mask)
  # Perturb every parameter so that zero-initialized tables, biases and post-norms matter.
  leaves, treedef = jax.tree.flatten(variables["params"])
  keys = jax.random.split(jax.random.key(5), len(leaves))
  params = treedef.unflatten([x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  loss, grads = loss_and_grads(unrolled, params, images, mask)
  scanned_loss, scanned_grads = loss_and_grads(scanned, params, images, mask)
  np.testing.assert_allclose(scanned_loss, loss, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(scanned_grads, grads, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["vit", pytest.param("swin", marks=pytest.mark.slow)])  # swin: compile time
def test_scanned_model_initializes_the_unrolled_parameter_tree_and_trains_with_drop_path(case):
  name, fields = TINY[case]
  images, mask = batch()
  unrolled = simmim(name, drop_path_rate=0.5, **fields).init(jax.random.key(0), images, mask)
  scanned_model = simmim(name, drop_path_rate=0.5, scan_blocks=True, **fields)
  scanned = scanned_model.init(jax.random.key(0), images, mask)
  chex.assert_trees_all_equal(scanned, unrolled)  # same names, shapes and values
  train = lambda key: scanned_model.apply(scanned, images, mask, train=True, rngs={"dropout": key})["loss"]
  evaluate = scanned_model.apply(scanned, images, mask)["loss"]
  assert len({float(train(jax.random.key(1))), float(train(jax.random.key(2))), float(evaluate)}) == 3


def test_stack_and_unstack_blocks_are_inverse():
  params = {f"blocks_{i}": {"attn": {"kernel": jnp.full((2, 3), i)}, "gamma": jnp.full((3,), i)} for i in range(3)}
  names = ["blocks_0", "blocks_2"]
  stacked = layers.stack_blocks(params, names)
  assert stacked["attn"]["kernel"].shape == (2, 2, 3) and stacked["gamma"][1, 0] == 2
  chex.assert_trees_all_equal(layers.unstack_blocks(stacked, names), {n: params[n] for n in names})


def test_scan_blocks_is_a_runtime_field_not_part_of_the_checkpoint_signature():
  assert "scan_blocks" in models.RUNTIME_FIELDS
  for name in ("vit_base_patch16", "swin_base_patch4_window6", "swinv2_giant_patch4_window12"):
    assert models.configurable_fields(name)["scan_blocks"] is False
  assert "scan_blocks" not in models.parameter_fields({"name": "vit_test_tiny", "scan_blocks": True})


def test_a_scanned_workdir_loads_converts_and_exports_to_official_and_hf(tmp_path):
  """A workdir whose config scans (simmim-convert --workdir with scan_blocks=True) loads with load_model, exports
  to the official state dict and to a transformers folder, and both read back as the same parameters, which
  the scanned and the unrolled model compute the same loss with."""
  name = "vit_test_tiny_plain"
  model = simmim(name, scan_blocks=True)
  images, mask = batch()
  variables = model.init(jax.random.key(0), images, mask)
  workdir = str(tmp_path / "scanned")
  convert.save_workdir(workdir, model, variables, encoder=name, overrides={"scan_blocks": True})
  loaded, loaded_variables, config = workdir_lib.load_model(workdir)
  assert loaded.encoder.scan_blocks and config.model.scan_blocks
  chex.assert_trees_all_equal(jax.device_get(loaded_variables), jax.device_get(variables))

  official = tmp_path / "official.safetensors"
  assert cli.convert_main([f"--checkpoint={workdir}", "--export", f"--out={official}"]) == 0
  state_dict = torch_files.load_state_dict(str(official))
  assert "encoder.blocks.1.attn.qkv.weight" in state_dict
  chex.assert_trees_all_equal(convert.official_to_flax(loaded, state_dict), jax.device_get(variables))

  hf = tmp_path / "hf"
  assert cli.convert_main([f"--checkpoint={workdir}", "--export", "--format=hf", f"--out={hf}"]) == 0
  from_hf, hf_variables = hf_export.from_hf(str(hf))
  assert not from_hf.encoder.scan_blocks and from_hf == loaded.clone(encoder=loaded.encoder.clone(scan_blocks=False))
  chex.assert_trees_all_equal(jax.device_get(hf_variables), jax.device_get(variables))
  np.testing.assert_allclose(loaded.apply(hf_variables, images, mask)["loss"],
                             from_hf.apply(hf_variables, images, mask)["loss"], rtol=1e-6)

  again = str(tmp_path / "again")  # the official file back into a workdir whose model scans
  assert cli.convert_main([f"--checkpoint={official}", f"--encoder={name}", "--override=scan_blocks=True",
                           f"--workdir={again}"]) == 0
  again_model, again_variables, _ = workdir_lib.load_model(again)
  assert again_model.encoder.scan_blocks
  chex.assert_trees_all_equal(jax.device_get(again_variables), jax.device_get(variables))


def test_the_linear_probe_reads_the_same_block_features_from_a_scanned_vit():
  from simmim_jax.models import classifier  # pylint: disable=g-import-not-at-top
  images, _ = batch()
  encoder = models.create_encoder("vit_test_tiny", depth=3)
  params = encoder.init(jax.random.key(0), images)["params"]
  unrolled = classifier.block_features(encoder, params, images, (1, 3))
  scanned = classifier.block_features(encoder.clone(scan_blocks=True), params, images, (1, 3))
  chex.assert_trees_all_close(scanned, unrolled)


@pytest.mark.parametrize("case", ["vit", "swin"])
def test_a_scanned_model_without_dropout_trains_without_a_dropout_key(case):
  """Every rate 0 (the official pretraining configs): the scanned blocks' traced drop-path rate of 0 asked for a
  'dropout' key no one passed (InvalidRngError compiling Swin-B for a TPU topology); the unrolled model needs none."""
  name, fields = TINY[case]
  images, mask = batch()
  model = simmim(name, drop_path_rate=0.0, scan_blocks=True, **fields)
  variables = simmim(name, drop_path_rate=0.0, **fields).init(jax.random.key(0), images, mask)
  scanned = model.apply(variables, images, mask, train=True)["loss"]
  unrolled = simmim(name, drop_path_rate=0.0, **fields).apply(variables, images, mask, train=True)["loss"]
  np.testing.assert_allclose(scanned, unrolled, rtol=1e-6)
