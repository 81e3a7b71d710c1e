"""data/finetune_pipeline.py: the eval iterator sees every example once; small images follow the official
transforms (no resize at eval, padded random crops in training); the in-memory digits source yields exactly the
batches of the digits folder."""

import numpy as np
import pytest

from simmim_jax.configs import finetune_config
from helpers import write_folder


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


@pytest.mark.parametrize("holdout", ["test", pytest.param("val", marks=pytest.mark.slow)])
def test_digits_source_yields_the_batches_of_the_written_digits_folder(tmp_path, holdout):
  # source="digits" (in memory) and source="folder" on the folder digits.py writes: the same images, labels,
  # order, split and transforms, so the same train batches (any step, any process) and eval batches.
  from simmim_jax.data import digits, finetune_pipeline
  counts = digits.write_digits_folder(str(tmp_path), 32, holdout=holdout)
  configs = []
  for source in ("folder", "digits"):
    data_config = finetune_config.get_config().data
    data_config.update(source=source, data_dir=str(tmp_path) if source == "folder" else "", eval_split=holdout)
    configs.append(data_config)
  info = finetune_pipeline.dataset_info(configs[1])
  assert info == finetune_pipeline.dataset_info(configs[0])
  assert info == {"num_classes": 10, "num_train": counts["train"], "num_eval": counts[holdout]}
  if holdout == "val":  # the few-label subset picks the same images
    for data_config in configs:
      data_config.train_examples_per_class = 3
  train = [finetune_pipeline.create_train_iterator(c, image_size=32, global_batch_size=16, seed=1, start_step=7,
                                                   randaugment_config="rand-m9-mstd0.5-inc1", reprob=0.25,
                                                   process_index=1, process_count=2) for c in configs]
  for _ in range(3):
    folder_batch, digits_batch = next(train[0]), next(train[1])
    np.testing.assert_array_equal(digits_batch["image"], folder_batch["image"])
    np.testing.assert_array_equal(digits_batch["label"], folder_batch["label"])
  evals = [list(finetune_pipeline.create_eval_iterator(c, image_size=32, global_batch_size=128, process_index=0,
                                                       process_count=1)) for c in configs]
  assert len(evals[1]) == len(evals[0]) == -(-counts[holdout] // 128)
  for folder_batch, digits_batch in zip(*evals):
    for key in ("image", "label", "valid"):  # eval at 32 px: the normalized pixels, unresized
      np.testing.assert_array_equal(digits_batch[key], folder_batch[key])
  labels = np.concatenate([b["label"][b["valid"] > 0] for b in evals[1]])
  assert np.bincount(labels).min() > 0 and len(labels) == counts[holdout]


def test_digits_source_renders_at_the_image_size_in_folder_order_and_refuses_other_splits():
  from simmim_jax.data import digits, finetune_pipeline
  images, labels = digits.digits_split("train", 48)
  assert images.shape == (1438, 48, 48, 1) and images.dtype == np.uint8
  assert (np.diff(labels) >= 0).all()  # by class (folder order), then by image number
  raw, raw_labels = digits.load_digits()
  index = digits.split_indices("train")
  np.testing.assert_array_equal(labels, raw_labels[index])
  np.testing.assert_array_equal(images[5, ..., 0], digits.render(raw[index[5]], 48))
  assert not set(index) & set(digits.split_indices("test"))
  data_config = finetune_config.get_config().data  # eval_split "validation" (ImageNet's)
  data_config.source = "digits"
  with pytest.raises(ValueError, match=r"data.eval_split='validation': source='digits' evaluates on 'test'"):
    finetune_pipeline.dataset_info(data_config)
  data_config.update(eval_split="test", train_split="val")
  with pytest.raises(ValueError, match=r"data.train_split='val': source='digits' trains on 'train'"):
    finetune_pipeline.dataset_info(data_config)
