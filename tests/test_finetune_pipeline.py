"""data/finetune_pipeline.py: the eval iterator sees every example once; small images follow the official
transforms (no resize at eval, padded random crops in training)."""

import numpy as np

from simmim_jax import finetune_config
from test_finetune import write_folder


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
