"""Input pipeline: sources, the official pretraining transform, exact resume and process sharding, global batches."""

import gc

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from simmim_jax import data
from simmim_jax.configs import default_config
from simmim_jax.data import demo_images, image_files, normalization
from helpers import assert_runs_without_tensorflow


def data_config(**overrides):
  config = default_config.get_config().data
  config.update(dict(source="demo", num_demo_images=24, shuffle_buffer_size=16) | overrides)
  return config


def take(iterator, num_batches):
  return [next(iterator)["image"] for _ in range(num_batches)]


def demo_stream(num_batches, *, seed=0, start_step=0, global_batch_size=8, process_index=0, process_count=1,
                **overrides):
  iterator = data.create_pretrain_iterator(
      data_config(**overrides), image_size=16, global_batch_size=global_batch_size, seed=seed,
      start_step=start_step, process_index=process_index, process_count=process_count)
  return take(iterator, num_batches)


def save_image(path, array, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


def random_pixels(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def assert_normalized_pixels(images):
  """ImageNet-normalized values of pixels in [0, 1] (checked before denormalize's clipping)."""
  pixels = images * np.float32(normalization.IMAGENET_STD) + np.float32(normalization.IMAGENET_MEAN)
  assert np.all(np.isfinite(images))
  assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


# --- normalization (TF-free) -----------------------------------------------------------------------------------


def test_normalize_then_denormalize_round_trips_uint8_and_float():
  images = random_pixels((2, 5, 7, 3))
  normalized = normalization.normalize(images)
  assert normalized.dtype == np.float32
  np.testing.assert_allclose(normalized[..., 1], (images[..., 1] / 255 - 0.456) / 0.224, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(normalization.denormalize(normalized), images / 255, atol=1e-6)
  np.testing.assert_allclose(normalization.normalize(images / 255), normalized, atol=1e-6)
  assert normalization.denormalize(np.full((1, 3), 100.0)).max() == 1.0  # overshooting reconstructions clip


def test_normalization_and_package_import_without_tensorflow():
  assert_runs_without_tensorflow("""
      import numpy as np
      from simmim_jax.data import normalization
      from simmim_jax import data
      x = np.zeros((1, 2, 2, 3), np.uint8)
      assert np.allclose(data.denormalize(normalization.normalize(x)), 0, atol=1e-6)
      from simmim_jax.data import demo_images, image_files
      assert demo_images.make_demo_images(2, 8).shape == (2, 8, 8, 3)
      """)


# --- the demo source -------------------------------------------------------------------------------------------


def test_demo_images_are_fixed_and_a_smaller_set_is_a_prefix():
  small, large = demo_images.make_demo_images(6, 24), demo_images.make_demo_images(12, 24)
  assert small.shape == (6, 24, 24, 3) and small.dtype == np.uint8
  np.testing.assert_array_equal(small, large[:6])
  assert len(demo_images.DEMO_PHOTOS) >= 10


def test_demo_batches_are_normalized_natural_photographs():
  (images,) = demo_stream(1, global_batch_size=16)
  assert images.shape == (16, 16, 16, 3) and images.dtype == np.float32
  assert_normalized_pixels(images)  # bilinear resizing does not overshoot
  assert np.all(np.abs(images.mean(axis=(0, 1, 2))) < 1.0)  # roughly centred, per channel
  assert np.all(images.std(axis=(0, 1, 2)) > 0.3)
  assert len({float(image.std()) for image in images}) == 16  # 16 different crops
  # Real image structure: horizontally neighbouring pixels are strongly correlated (about 0 for noise).
  correlation = np.corrcoef(images[:, :, :-1].ravel(), images[:, :, 1:].ravel())[0, 1]
  assert correlation > 0.8
  noise = np.random.default_rng(0).normal(size=images.shape)
  assert abs(np.corrcoef(noise[:, :, :-1].ravel(), noise[:, :, 1:].ravel())[0, 1]) < 0.1


def test_identity_crop_shows_each_demo_image_exactly_once_per_epoch():
  """With crop scale = ratio = 1 at the stored size, samples are the stored images, normalized, in a permutation."""
  num_images = 16
  stored = normalization.normalize(demo_images.make_demo_images(num_images))  # [16, 96, 96, 3]
  iterator = data.create_pretrain_iterator(
      data_config(num_demo_images=num_images, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), horizontal_flip=False),
      image_size=96, global_batch_size=8, seed=3, process_index=0, process_count=1)
  for _ in range(2):  # two epochs of two steps
    epoch = np.concatenate(take(iterator, 2))
    distances = np.abs(epoch[:, None] - stored[None]).max(axis=(2, 3, 4))  # [samples, stored images]
    assert np.all(distances.min(axis=1) < 1e-4)
    np.testing.assert_array_equal(np.sort(distances.argmin(axis=1)), np.arange(num_images))


def test_horizontal_flip_mirrors_about_half_of_the_samples():
  stored = normalization.normalize(demo_images.make_demo_images(8))
  iterator = data.create_pretrain_iterator(
      data_config(num_demo_images=8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), horizontal_flip=True),
      image_size=96, global_batch_size=8, seed=0, process_index=0, process_count=1)
  images = np.concatenate(take(iterator, 4))  # 32 samples
  plain = np.abs(images[:, None] - stored[None]).max(axis=(2, 3, 4)).min(axis=1) < 1e-4
  mirrored = np.abs(images[:, None] - stored[None, :, :, ::-1]).max(axis=(2, 3, 4)).min(axis=1) < 1e-4
  assert np.all(plain | mirrored)
  assert 6 <= mirrored.sum() <= 26


# --- determinism, resume and process sharding --------------------------------------------------------------------


def test_same_seed_gives_identical_batches_and_another_seed_differs():
  first, again, other = demo_stream(2, seed=1), demo_stream(2, seed=1), demo_stream(2, seed=2)
  np.testing.assert_array_equal(np.stack(first), np.stack(again))
  assert not np.allclose(first[0], other[0])


def test_start_step_resumes_at_exactly_that_batch():
  # 24 images, 8 per step: the stream crosses epoch boundaries at steps 3 and 6.
  uninterrupted = demo_stream(7)
  np.testing.assert_array_equal(np.stack(demo_stream(3, start_step=4)), np.stack(uninterrupted[4:]))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_concatenate_to_the_global_batch(process_count):
  global_batches = demo_stream(2, global_batch_size=8, start_step=2)
  shards = [demo_stream(2, global_batch_size=8, start_step=2, process_index=p, process_count=process_count)
            for p in range(process_count)]
  for step in range(2):
    assert shards[0][step].shape == (8 // process_count, 16, 16, 3)
    np.testing.assert_array_equal(np.concatenate([shard[step] for shard in shards]), global_batches[step])


def test_sample_index_stream_is_an_epoch_permutation_split_between_processes():
  from simmim_jax.data import pipeline

  def pairs(process_index, process_count, start_step=0):
    stream = pipeline.sample_index_stream(10, seed=5, start_step=start_step, global_batch_size=4,
                                          process_index=process_index, process_count=process_count)
    return np.array([(int(s), int(i)) for s, i in stream.take(40 // process_count).as_numpy_iterator()])

  single = pairs(0, 1)  # [40, (sample, image)]: 10 global batches, 4 epochs
  np.testing.assert_array_equal(single[:, 0], np.arange(40))
  epochs = single[:, 1].reshape(4, 10)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(10))
  assert len({tuple(epoch) for epoch in epochs}) == 4  # a fresh order every epoch
  halves = [pairs(p, 2).reshape(10, 2, 2) for p in range(2)]  # [batches, rows, (sample, image)]
  np.testing.assert_array_equal(np.concatenate(halves, axis=1).reshape(40, 2), single)
  np.testing.assert_array_equal(pairs(0, 1, start_step=3)[:28], single[12:])


def test_batch_not_divisible_by_process_count_names_both():
  with pytest.raises(ValueError, match=r"global_batch_size=10.*process_count=4"):
    data.create_pretrain_iterator(data_config(), image_size=16, global_batch_size=10, seed=0, process_index=0,
                                  process_count=4)


# --- RandomResizedCrop window sampling -------------------------------------------------------------------------


def crop_windows(height, width, num_seeds, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)):
  import tensorflow as tf

  from simmim_jax.data import augment

  @tf.function
  def sample(seeds):
    return tf.map_fn(lambda seed: tf.stack(augment.sample_crop_window(seed, height, width, scale, ratio)), seeds,
                     fn_output_signature=tf.int32)

  seeds = tf.stack([tf.range(num_seeds, dtype=tf.int64), tf.fill([num_seeds], tf.constant(7, tf.int64))], axis=1)
  return sample(seeds).numpy()  # [num_seeds, (top, left, height, width)]


@pytest.mark.parametrize("scale, ratio", [((0.67, 1.0), (3 / 4, 4 / 3)), ((0.08, 1.0), (3 / 4, 4 / 3)),
                                          ((0.2, 0.5), (0.5, 2.0))])
def test_crop_windows_respect_scale_and_ratio_bounds(scale, ratio):
  height, width = 240, 320
  windows = crop_windows(height, width, 400, scale, ratio)
  top, left, crop_height, crop_width = windows.T
  assert np.all((top >= 0) & (left >= 0) & (crop_height >= 1) & (crop_width >= 1))
  assert np.all((top + crop_height <= height) & (left + crop_width <= width))
  # Rounding each side to whole pixels moves the area and ratio by at most about 1 / side.
  tolerance = 1.5 / np.minimum(crop_height, crop_width)
  area_fraction = crop_height * crop_width / (height * width)
  assert np.all(area_fraction >= scale[0] * (1 - 2 * tolerance))
  assert np.all(area_fraction <= scale[1] * (1 + 2 * tolerance))
  aspect = crop_width / crop_height
  assert np.all((aspect >= ratio[0] * (1 - 2 * tolerance)) & (aspect <= ratio[1] * (1 + 2 * tolerance)))
  # The windows really are random: sizes and positions spread over their ranges.
  assert len(np.unique(area_fraction.round(2))) > 10 and len(np.unique(left)) > 20


@pytest.mark.parametrize("height, width, window", [
    (17, 301, (0, 139, 17, 23)),    # too wide: full height, width = round(17 * 4/3), centred
    (301, 17, (139, 0, 23, 17)),    # too tall: full width, height = round(17 / (3/4)), centred
])
def test_crop_window_falls_back_to_a_centre_crop_clamped_to_the_ratio(height, width, window):
  windows = crop_windows(height, width, 20)
  np.testing.assert_array_equal(windows, np.tile(window, (20, 1)))


# --- the folder source -------------------------------------------------------------------------------------------


def write_mixed_folder(root, layout):
  """Grayscale PNG, RGBA PNG, JPEG smaller than the crop, BMP, GIF, odd sizes and letter cases, plus non-images."""
  directory = (lambda name: root / name) if layout == "flat" else (lambda name: root / f"class_{len(name) % 2}" / name)
  save_image(directory("gray.png"), random_pixels((17, 301)))
  save_image(directory("rgba.png"), random_pixels((500, 40, 4)))
  save_image(directory("small.JPG"), random_pixels((12, 9, 3)), quality=95)
  save_image(directory("photo.jpeg"), random_pixels((64, 48, 3)))
  save_image(directory("bitmap.bmp"), random_pixels((30, 30, 3)))
  save_image(directory("frame.gif"), random_pixels((20, 25)))
  (root / "notes.txt").write_text("not an image")
  (root / "._photo.jpeg").write_bytes(b"macOS metadata, not an image")
  return 6


@pytest.mark.parametrize("layout", ["flat", "class_subfolders"])
def test_folder_of_mixed_formats_and_sizes_yields_batches(tmp_path, layout):
  num_files = write_mixed_folder(tmp_path, layout)
  assert len(image_files.list_image_files(str(tmp_path))) == num_files
  iterator = data.create_pretrain_iterator(data_config(source="folder", data_dir=str(tmp_path)), image_size=32,
                                           global_batch_size=6, seed=0, process_index=0, process_count=1)
  for images in take(iterator, 2):
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.float32
    assert_normalized_pixels(images)


def test_grayscale_files_become_rgb_with_equal_channels(tmp_path):
  save_image(tmp_path / "gray.png", random_pixels((40, 50)))
  iterator = data.create_pretrain_iterator(data_config(source="folder", data_dir=str(tmp_path)), image_size=16,
                                           global_batch_size=2, seed=0, process_index=0, process_count=1)
  pixels = normalization.denormalize(next(iterator)["image"])
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-5)
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 2], atol=1e-5)


def test_image_files_are_found_recursively_and_sorted(tmp_path):
  for name in ["b/2.png", "a/x/1.PNG", "a/0.jpg", "c.txt", "a/.hidden.png"]:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b"")
  found = [p[len(str(tmp_path)) + 1:] for p in image_files.list_image_files(str(tmp_path))]
  assert found == ["a/0.jpg", "a/x/1.PNG", "b/2.png"]


def test_missing_or_empty_folder_error_names_the_path(tmp_path):
  missing = tmp_path / "no_such_folder"
  with pytest.raises(ValueError, match="no_such_folder.*does not exist"):
    data.create_pretrain_iterator(data_config(source="folder", data_dir=str(missing)), image_size=16,
                                  global_batch_size=2, seed=0, process_index=0, process_count=1)
  (tmp_path / "empty" / "class_a").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"empty.*holds no images"):
    image_files.list_image_files(str(tmp_path / "empty"))


# --- the tfds source -------------------------------------------------------------------------------------------


def test_tfds_source_on_mocked_imagenet_yields_process_batches():
  import tensorflow_datasets as tfds

  config = data_config(source="tfds", name="imagenet2012", split="train")
  with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    iterator = data.create_pretrain_iterator(config, image_size=24, global_batch_size=8, seed=0, process_index=1,
                                             process_count=2)
    batches = take(iterator, 3)  # more than the mocked examples: the split repeats
    del iterator  # finish the mock's generator-backed reader while Python is fully alive
    gc.collect()
  for images in batches:
    assert images.shape == (4, 24, 24, 3) and images.dtype == np.float32
    assert_normalized_pixels(images)
    assert images.std() > 0.1


# --- global batches ----------------------------------------------------------------------------------------------


def test_make_global_batch_shards_rows_over_the_data_axis():
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  rows = 2 * jax.device_count()
  local = {"image": np.arange(rows * 4 * 4 * 3, dtype=np.float32).reshape(rows, 4, 4, 3)}
  batch = data.make_global_batch(local, sharding)
  image = batch["image"]
  assert isinstance(image, jax.Array) and image.shape == local["image"].shape
  assert image.sharding.is_equivalent_to(sharding, image.ndim)
  assert len(image.addressable_shards) == jax.device_count()
  for shard in image.addressable_shards:
    assert shard.data.shape == (2, 4, 4, 3)
    np.testing.assert_array_equal(shard.data, local["image"][shard.index])
  np.testing.assert_array_equal(np.asarray(image), local["image"])


def test_digits_validation_folder_holds_only_train_split_images(tmp_path):
  from simmim_jax.data import digits  # needs scikit-learn (the test extra)
  assert digits.write_digits_folder(str(tmp_path / "test"), 32) == {"train": 1438, "test": 359}
  assert digits.write_digits_folder(str(tmp_path / "val"), 32, holdout="val") == {"train": 1151, "val": 287}
  names = lambda root, split: {p.name for p in (tmp_path / root / split).rglob("*.png")}
  assert names("val", "train") | names("val", "val") == names("test", "train")
  assert not (tmp_path / "val" / "test").exists()
  image = np.asarray(Image.open(next((tmp_path / "test" / "train").rglob("*.png"))))[..., 0]
  patches = image.reshape(8, 4, 8, 4).transpose(0, 2, 1, 3).reshape(64, 16)
  assert (patches.std(axis=1) > 0).any()  # some 4-px patches straddle a digit-pixel edge
