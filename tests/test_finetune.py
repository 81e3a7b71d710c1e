"""Fine-tuning and linear probing: layer decay, pretrained loading, interpolation, mixup, metrics, data, and
short end-to-end runs of simmim-finetune / simmim-linear-probe from a short simmim-pretrain run."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from simmim_jax import checkpoint, finetune, finetune_config, mixup, models, optim, pos_interpolation
from simmim_jax import workdir as workdir_lib
from simmim_jax.models import classifier
from snapshots import snapshot

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# Layer-wise lr decay


def _flat_ids(encoder):
  model = classifier.Classifier(encoder=encoder, num_classes=10)
  size = encoder.img_size
  params = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, size, size, 3)))["params"], jax.random.key(0))
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(optim.layer_ids(params, encoder)).items()}


def test_vit_base_layer_decay_has_the_14_official_layer_ids():
  encoder = models.create_encoder("vit_base_patch16", use_mean_pooling=True, use_rel_pos_bias=True,
                                  use_shared_rel_pos_bias=False)
  ids = _flat_ids(encoder)
  assert optim.num_layer_ids(encoder) == 14 and set(ids.values()) == set(range(14))
  assert ids["encoder/patch_embed/kernel"] == 0 and ids["encoder/cls_token"] == 0
  assert ids["encoder/blocks_0/attn/qkv/kernel"] == 1 and ids["encoder/blocks_11/mlp/fc2/bias"] == 12
  assert ids["encoder/fc_norm/scale"] == 13 and ids["head/kernel"] == 13


def test_swin_base_layer_decay_has_the_26_official_layer_ids():
  encoder = models.create_encoder("swin_base_patch4_window7")
  ids = _flat_ids(encoder)
  assert optim.num_layer_ids(encoder) == 26 and set(ids.values()) == set(range(26))
  assert ids["encoder/patch_embed/proj/kernel"] == 0
  assert ids["encoder/layers_0/blocks_0/norm1/scale"] == 1
  assert ids["encoder/layers_0/downsample/reduction/kernel"] == 2  # = the stage's last block
  assert ids["encoder/layers_2/blocks_17/attn/qkv/kernel"] == 2 + 2 + 17 + 1
  assert ids["encoder/layers_2/downsample/norm/scale"] == 22
  assert ids["encoder/layers_3/blocks_1/mlp/fc1/kernel"] == 24
  assert ids["encoder/norm/scale"] == 25 and ids["head/bias"] == 25


def _first_update_lrs(encoder_name, layer_decay, warmup_steps):
  """|update| of AdamW's first step with unit gradients and no weight decay = each parameter's lr."""
  config = finetune_config.get_config()
  config.model = ml_collections.ConfigDict({"name": encoder_name})
  config.img_size = 32
  config.global_batch_size, config.total_steps, config.warmup_steps = 512, 100, warmup_steps
  config.warmup_epochs = 0  # only warmup_steps counts
  config.optimizer.update(layer_decay=layer_decay, weight_decay=0.0, base_lr=1e-3, warmup_lr=1e-6, min_lr=1e-6,
                          clip_grad_norm=0.0)
  encoder = models.create_encoder(encoder_name)
  model = classifier.Classifier(encoder=encoder, num_classes=3)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  tx, _ = optim.create_finetune_optimizer(config, encoder)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), jax.jit(tx.init)(params), params)
  lrs = {k: float(np.abs(np.asarray(v)).max()) for k, v in traverse_util.flatten_dict(updates).items()}
  ids = traverse_util.flatten_dict(optim.layer_ids(params, encoder))
  return lrs, ids, optim.num_layer_ids(encoder)


@pytest.mark.parametrize("encoder_name", ["vit_test_tiny", "swin_test_tiny"])
def test_layer_decay_scales_each_parameters_peak_lr_but_not_the_warmup_lr(encoder_name):
  lrs, ids, num_ids = _first_update_lrs(encoder_name, layer_decay=0.5, warmup_steps=0)
  for path, lr in lrs.items():
    np.testing.assert_allclose(lr, 1e-3 * 0.5 ** (num_ids - 1 - ids[path]), rtol=1e-3, err_msg=str(path))
  warmup_lrs, _, _ = _first_update_lrs(encoder_name, layer_decay=0.5, warmup_steps=10)
  np.testing.assert_allclose(list(warmup_lrs.values()), 1e-6, rtol=1e-3)  # official: not layer-decayed


# ----------------------------------------------------------------------------------------------------
# Relative position tables and position embeddings


def test_geometric_interpolation_keeps_values_at_matching_offsets():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(11 * 11, 4)).astype(np.float32)  # Swin window 6 -> 7
  resized = pos_interpolation.resize_relative_position_table(table, 13 * 13)
  src, dst = table.reshape(11, 11, 4), resized.reshape(13, 13, 4)
  for dy in (-1, 0, 1):  # the geo grid puts source offsets 0 and +-1 on integer target offsets
    for dx in (-1, 0, 1):
      np.testing.assert_allclose(dst[6 + dy, 6 + dx], src[5 + dy, 5 + dx], atol=1e-5)
  assert np.all(np.isfinite(resized))
  np.testing.assert_array_equal(pos_interpolation.resize_relative_position_table(table, 121), table)


def test_vit_table_interpolation_keeps_the_three_cls_rows():
  table = np.random.default_rng(1).normal(size=(13 * 13 + 3, 2)).astype(np.float32)  # grid 7 -> 8
  resized = pos_interpolation.resize_relative_position_table(table, 15 * 15 + 3, num_extra=3)
  np.testing.assert_array_equal(resized[-3:], table[-3:])
  np.testing.assert_allclose(resized[:-3].reshape(15, 15, 2)[7, 7], table[:-3].reshape(13, 13, 2)[6, 6], atol=1e-5)


def test_absolute_position_embedding_resize_keeps_cls_and_constant_grids():
  embedding = np.concatenate([np.full((1, 1, 4), 7.0), np.full((1, 16, 4), 2.0)], axis=1)  # cls + 4x4
  resized = pos_interpolation.resize_absolute_position_embedding(embedding, 1 + 36, num_extra=1)
  assert resized.shape == (1, 37, 4)
  np.testing.assert_allclose(resized[0, 0], 7.0)
  np.testing.assert_allclose(resized[0, 1:], 2.0, atol=1e-5)


def test_mismatched_checkpoint_error_names_the_parameters():
  images = jnp.zeros((1, 32, 32, 3))
  params = lambda **fields: models.create_encoder("vit_test_tiny", **fields).init(jax.random.key(0), images)["params"]
  with pytest.raises(pos_interpolation.CheckpointMismatchError, match=r"blocks_0/attn/qkv/kernel: checkpoint "
                     r"shape \(32, 96\) != model shape \(48, 144\)"):
    pos_interpolation.remap_pretrained(params(), params(embed_dim=48), is_vit=True)
  with pytest.raises(pos_interpolation.CheckpointMismatchError, match="blocks_2/attn/proj/kernel: missing from"):
    pos_interpolation.remap_pretrained(params(), params(depth=3), is_vit=True)
  with pytest.raises(pos_interpolation.CheckpointMismatchError, match="blocks_2/mlp/fc1/bias: in the checkpoint but "
                     "not in the model"):
    pos_interpolation.remap_pretrained(params(depth=3), params(), is_vit=True)


# ----------------------------------------------------------------------------------------------------
# Mixup / CutMix and metrics


def test_mixup_targets_sum_to_one_and_match_the_mixing_ratio():
  images = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
  labels = jnp.arange(6)
  for seed in range(4):
    mixed, targets, lam = mixup.mixup_cutmix(jax.random.key(seed), images, labels, num_classes=10,
                                             mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(targets[jnp.arange(6), labels], lam, rtol=1e-6)
    np.testing.assert_allclose(targets[jnp.arange(6), labels[::-1]], 1 - lam, rtol=1e-6)
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)


def test_cutmix_lam_is_the_fraction_of_own_pixels_and_smoothing_keeps_the_sum():
  images = jnp.broadcast_to(jnp.arange(4.0)[:, None, None, None], (4, 16, 16, 3))  # image i is constant i
  labels = jnp.arange(4)
  for seed in range(4):
    mixed, targets, lam = mixup.mixup_cutmix(jax.random.key(seed), images, labels, num_classes=5,
                                             mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.1)
    own_fraction = float(jnp.mean(mixed[0] == 0.0))  # image 0 mixed with image 3
    np.testing.assert_allclose(own_fraction, lam, atol=1e-6)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(targets[0, 0], lam * (0.9 + 0.02) + (1 - lam) * 0.02, rtol=1e-5)


def test_top1_and_top5_on_a_hand_made_example():
  logits = jnp.array([[0.0, 5, 4, 3, 2, 1, -1],    # label 1: top-1
                      [0.0, 5, 4, 3, 2, 1, -1],    # label 5: 5th highest -> top-5 only
                      [0.0, 5, 4, 3, 2, 1, -1],    # label 6: neither
                      [9.0, 5, 4, 3, 2, 1, -1]])   # label 0: top-1, but padded (valid 0)
  labels = jnp.array([1, 5, 6, 0])
  sums = finetune.classification_sums(logits, labels, jnp.array([1.0, 1.0, 1.0, 0.0]))
  assert float(sums["top1"]) == 1 and float(sums["top5"]) == 2 and float(sums["count"]) == 3


# ----------------------------------------------------------------------------------------------------
# Data


def write_folder(root, num_classes=3, train_per_class=6, test_counts=(3, 4, 3)):
  """A tiny ImageFolder: class c is a noisy image of colour c (variable sizes)."""
  rng = np.random.default_rng(0)
  colours = [(220, 30, 30), (30, 200, 40), (40, 40, 220)]
  for split, counts in (("train", [train_per_class] * num_classes), ("test", test_counts)):
    for c in range(num_classes):
      os.makedirs(root / split / f"class_{c}", exist_ok=True)
      for i in range(counts[c]):
        size = (int(rng.integers(36, 60)), int(rng.integers(36, 60)))
        pixels = np.clip(np.array(colours[c]) + rng.normal(0, 25, size + (3,)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / f"class_{c}" / f"{i}.png")
  return root


def test_eval_iterator_sees_every_example_once_with_padding(tmp_path):
  from simmim_jax.data import finetune_pipeline
  data_config = finetune_config.get_config().data
  data_config.update(source="folder", data_dir=str(write_folder(tmp_path)), eval_split="test")
  info = finetune_pipeline.dataset_info(data_config)
  assert info == {"num_classes": 3, "num_train": 18, "num_eval": 10}
  batches = list(finetune_pipeline.create_eval_iterator(data_config, image_size=16, global_batch_size=4,
                                                        process_index=0, process_count=1))
  assert len(batches) == 3 and batches[0]["image"].shape == (4, 16, 16, 3)
  valid = np.concatenate([b["valid"] for b in batches]) > 0
  labels = np.concatenate([b["label"] for b in batches])[valid]
  assert valid.sum() == 10 and sorted(labels.tolist()) == [0] * 3 + [1] * 4 + [2] * 3
  data_config.train_examples_per_class = 2
  assert finetune_pipeline.dataset_info(data_config)["num_train"] == 6


def test_small_images_are_evaluated_as_they_are_and_trained_on_padded_random_crops():
  # Official data_finetune.py at IMG_SIZE <= 32: no eval Resize / CenterCrop, RandomCrop(32, padding=4) for training.
  from simmim_jax.data import finetune_pipeline, normalization
  from simmim_jax.data._tensorflow import tf
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
  evaluated = finetune_pipeline.eval_transform(tf.constant(image), image_size=32).numpy()
  np.testing.assert_allclose(evaluated, normalization.normalize(image), atol=1e-5)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0))).astype(np.float32)
  windows = {}  # (top, left, flipped) -> that window of the padded image
  for top in range(9):
    for left in range(9):
      window = padded[top:top + 32, left:left + 32]
      windows[(top, left, False)], windows[(top, left, True)] = window, window[:, ::-1]
  offsets = set()
  for i in range(8):
    trained = finetune_pipeline.train_transform(tf.constant(image), tf.constant([i, 0], tf.int64), image_size=32,
                                                crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
                                                randaugment_config="", reprob=0.0).numpy()
    match = [k for k, w in windows.items() if np.allclose(trained, normalization.normalize(w / 255.0), atol=1e-5)]
    assert match, f"train image {i} is not a flip of a 32-px window of the 4-px zero-padded image"
    offsets.add(match[0][:2])
  assert len(offsets) > 1  # the window moves
  unshifted = finetune_pipeline.train_transform(tf.constant(image), tf.constant([0, 0], tf.int64), image_size=32,
                                                crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
                                                randaugment_config="", reprob=0.0, crop_padding=0).numpy()
  assert any(np.allclose(unshifted, normalization.normalize(w), atol=1e-5) for w in (image, image[:, ::-1]))


def test_randaugment_ops_keep_shape_and_range_and_are_identity_at_magnitude_zero():
  from simmim_jax.data import randaugment
  import tensorflow as tf
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (20, 24, 3)), tf.float32)
  for sign in (1.0, -1.0):
    for index, op in enumerate(randaugment._ops(image, tf.constant(9.0), tf.constant(sign))):
      out = op().numpy()
      assert out.shape == (20, 24, 3) and out.min() >= 0 and out.max() <= 255, index
  zero_ops = randaugment._ops(image, tf.constant(0.0), tf.constant(1.0))
  for index in (3, 7, 8, 9, 10, 11, 12, 13, 14):  # rotate, enhance x4, shear x2, translate x2
    np.testing.assert_allclose(zero_ops[index]().numpy(), image.numpy(), atol=1.0, err_msg=str(index))
  augmented = randaugment.rand_augment(image, tf.constant([1, 2], tf.int64), "rand-m9-mstd0.5-inc1")
  assert augmented.shape == (20, 24, 3)


# ----------------------------------------------------------------------------------------------------
# Pretrained loading and end to end


def run_cli(program, config, workdir, *extra, timeout=600):
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  env.pop("XLA_FLAGS", None)  # one CPU device
  code = f"import sys; from simmim_jax.main import {program}; sys.argv[0] = '{program}'; {program}()"
  return subprocess.run([sys.executable, "-c", code, f"--config={config}", f"--workdir={workdir}", *extra],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def pretrained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrain") / "run"
  result = run_cli("pretrain_main", "configs/demo.py", workdir, "--config.model.embed_dim=32",
                   "--config.model.depth=2", "--config.model.num_heads=2", "--config.global_batch_size=16",
                   "--config.data.num_demo_images=64", "--config.warmup_steps=1", "--config.total_steps=3",
                   "--config.reconstruction_every_steps=0")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return write_folder(tmp_path_factory.mktemp("folder"))


def test_pretrained_weights_replace_the_encoder_and_leave_the_head_fresh(pretrained_workdir, folder):
  config = finetune_config.get_config()
  config.update(pretrained=str(pretrained_workdir), img_size=32)
  config.data.update(source="folder", data_dir=str(folder), eval_split="test")
  config.global_batch_size, config.total_steps = 8, 2
  config = finetune.resolve_config(config, str(folder.parent / "unused"))
  assert config.model.embed_dim == 32 and config.model.depth == 2 and config.num_classes == 3  # from the runs
  model = finetune.build_classifier(config)
  fresh = finetune.init_params(model, jax.random.key(0))
  pretrained = finetune.load_pretrained_encoder_params(config)
  loaded, report = finetune.with_pretrained_encoder(fresh, pretrained, model.encoder)
  np.testing.assert_array_equal(loaded["encoder"]["blocks_1"]["attn"]["qkv"]["kernel"],
                                pretrained["blocks_1"]["attn"]["qkv"]["kernel"])
  assert not np.allclose(loaded["encoder"]["blocks_1"]["attn"]["qkv"]["kernel"],
                         fresh["encoder"]["blocks_1"]["attn"]["qkv"]["kernel"])
  for block in ("blocks_0", "blocks_1"):  # the shared table is copied into every block
    np.testing.assert_array_equal(
        loaded["encoder"][block]["attn"]["relative_position_bias"]["relative_position_bias_table"],
        pretrained["rel_pos_bias"]["relative_position_bias_table"])
  jax.tree.map(np.testing.assert_array_equal, loaded["head"], jax.device_get(fresh["head"]))
  jax.tree.map(np.testing.assert_array_equal, loaded["encoder"]["fc_norm"], jax.device_get(fresh["encoder"]["fc_norm"]))
  assert "mask_token" in report["dropped"] and set(report["fresh"]) == {"fc_norm/bias", "fc_norm/scale"}


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


FINETUNE_TINY = ["--config.global_batch_size=8", "--config.warmup_steps=1", "--config.log_every_steps=1",
                 "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2", "--config.data.eval_split=test"]


@pytest.mark.slow  # end to end through subprocesses; .ci/run runs it
def test_short_finetune_from_a_pretraining_run_evaluates_keeps_the_best_and_resumes(pretrained_workdir, folder,
                                                                                     tmp_path):
  workdir = tmp_path / "finetune"
  common = [f"--config.pretrained={pretrained_workdir}", f"--config.data.data_dir={folder}", *FINETUNE_TINY]
  result = run_cli("finetune_main", "configs/finetune/demo.py", workdir, "--config.total_steps=2", *common)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Loaded" in result.stdout and "eval step 2" in result.stdout
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["embed_dim"] == 32 and config["num_classes"] == 3 and config["num_train_images"] == 18
  resumed = run_cli("finetune_main", "configs/finetune/demo.py", workdir, "--config.total_steps=4", *common)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "from step 2" in resumed.stdout and "Loaded" not in resumed.stdout  # resumed, not re-initialized
  rows = read_metrics(workdir)
  evals = [r for r in rows if "eval_top1" in r]
  assert [r["step"] for r in evals] == [2, 4]
  assert all(0 <= r["eval_top1"] <= r["eval_top5"] <= 100 for r in evals)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"] and len(os.listdir(workdir / "best")) == 1


def test_short_linear_probe_of_every_block_from_a_pretraining_run(pretrained_workdir, folder, tmp_path):
  workdir = tmp_path / "probe"
  result = run_cli("linear_probe_main", "configs/linear_probe/demo.py", workdir,
                   f"--config.pretrained={pretrained_workdir}", f"--config.data.data_dir={folder}",
                   "--config.probe_blocks=(1,2)", "--config.total_steps=3", *FINETUNE_TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  last = [r for r in read_metrics(workdir) if "eval_top1" in r][-1]
  assert last["step"] == 3 and {"eval_top1_block1", "eval_top1_block2", "eval_top5"} <= set(last)
  assert last["eval_top1"] == last["eval_top1_block1"]


@pytest.mark.parametrize("program", ["finetune", "linear_probe"])
def test_a_workdir_of_another_model_is_refused_with_its_checkpointer_closed(program, folder, tmp_path, monkeypatch):
  from simmim_jax import linear_probe
  module = {"finetune": finetune, "linear_probe": linear_probe}[program]
  config = finetune_config.get_config() if program == "finetune" else finetune_config.get_linear_probe_config()
  config.model.update(name="vit_base_patch16", patch_size=4, embed_dim=32, depth=2, num_heads=2)
  config.update(img_size=32, global_batch_size=8, total_steps=2, warmup_steps=1, probe_blocks=(1,))
  config.data.update(source="folder", data_dir=str(folder), eval_split="test")
  workdir = tmp_path / "work"
  other = checkpoint.Checkpointer(str(workdir / workdir_lib.CHECKPOINT_DIRNAME))
  other.save(2, {"w": jnp.zeros(())}, {"step": 2, "signature": {"model": "another"}})
  other.close()
  opened, closed = [], []
  original_init, original_close = checkpoint.Checkpointer.__init__, checkpoint.Checkpointer.close

  def recording_init(self, *args, **kwargs):
    opened.append(self)
    original_init(self, *args, **kwargs)

  def recording_close(self):
    closed.append(self)
    original_close(self)

  monkeypatch.setattr(checkpoint.Checkpointer, "__init__", recording_init)
  monkeypatch.setattr(checkpoint.Checkpointer, "close", recording_close)
  before = snapshot(workdir)
  with pytest.raises(finetune.ConfigError, match=r"checkpoints holds checkpoints of another model \(\{'model': "
                     r"'another'\}\), not of this config's .*; use another --workdir"):
    module.train_and_evaluate(config, str(workdir))
  assert all(c in closed for c in opened)  # nothing left open (no best/ checkpointer either)
  assert snapshot(workdir) == before  # refused before writing: no config.json, no lock, nothing moved


def test_finetune_config_errors_are_clear(folder, tmp_path):
  result = run_cli("finetune_main", "configs/finetune/demo.py", tmp_path / "bad",
                   f"--config.pretrained={tmp_path / 'nowhere'}", f"--config.data.data_dir={folder}")
  assert result.returncode == 2 and "not a simmim-pretrain workdir" in result.stderr
  assert "Traceback" not in result.stderr


def test_official_finetune_configs_build_their_encoders():
  import importlib.util
  for path in sorted((ROOT / "configs" / "finetune").glob("*.py")):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    fields = finetune.resolve_model_fields(config)
    encoder = finetune.build_encoder(fields, config.img_size, jnp.float32)
    assert encoder.img_size == config.img_size, path.name


def test_crop_padding_and_probe_optimizer_errors_name_the_key(folder, tmp_path):
  config = finetune_config.get_config()
  config.data.crop_padding = -1
  with pytest.raises(finetune.ConfigError, match=r"config.data.crop_padding=-1"):
    finetune.resolve_config(config, str(tmp_path / "unused"))
  result = run_cli("linear_probe_main", "configs/linear_probe/demo.py", tmp_path / "bad_probe",
                   "--config.optimizer.name=adam", f"--config.data.data_dir={folder}")
  assert result.returncode == 2 and "config.optimizer.name='adam'" in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
