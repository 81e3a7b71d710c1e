"""Mixup / CutMix per group (timm mixes each GPU's local batch on its own): pairing and lam per group."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simmim_jax.train import mixup

BATCH, GROUPS = 12, 3
SIZE = BATCH // GROUPS


def constant_images(batch=BATCH, side=16):
  """Image i is the constant i + 1 (distinguishable), label i (one-hot with num_classes = batch)."""
  values = jnp.arange(1.0, batch + 1.0)
  return jnp.broadcast_to(values[:, None, None, None], (batch, side, side, 3)), jnp.arange(batch)


def partners_and_own_weights(targets):
  """From smoothing-free targets: (partner of each image = its other label, -1 if unmixed; own label weight)."""
  targets = np.asarray(targets)
  own = targets[np.arange(len(targets)), np.arange(len(targets))]
  others = targets.copy()
  others[np.arange(len(targets)), np.arange(len(targets))] = 0.0
  return np.where(others.max(-1) > 0, others.argmax(-1), -1), own


MIX = jax.jit(functools.partial(mixup.mixup_cutmix, num_classes=BATCH, mixup_alpha=0.8, cutmix_alpha=0.0,
                                label_smoothing=0.0, groups=GROUPS))
CUT = jax.jit(functools.partial(mixup.mixup_cutmix, num_classes=BATCH, mixup_alpha=0.0, cutmix_alpha=1.0,
                                label_smoothing=0.0, groups=GROUPS))


@pytest.mark.parametrize("seed", range(3))
def test_mixup_pairs_within_each_group_with_one_lam_per_group(seed):
  images, labels = constant_images()
  mixed, targets, lam = MIX(jax.random.key(seed), images, labels)
  assert lam.shape == (GROUPS,)
  partner, own = partners_and_own_weights(targets)
  group = np.arange(BATCH) // SIZE
  np.testing.assert_array_equal(group[partner], group)  # pairs never cross a group
  # timm x.flip(0) inside the group: position k pairs with SIZE - 1 - k
  np.testing.assert_array_equal(partner % SIZE, SIZE - 1 - np.arange(BATCH) % SIZE)
  np.testing.assert_allclose(own, np.asarray(lam)[group], rtol=1e-6)  # one lam per group, its own
  assert len(set(np.round(np.asarray(lam), 6))) == GROUPS, lam     # and the groups' lams differ
  value = np.arange(1.0, BATCH + 1.0)
  expected = own * value + (1 - own) * value[partner]
  np.testing.assert_allclose(np.asarray(mixed)[:, 0, 0, 0], expected, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_cutmix_boxes_and_lams_are_drawn_per_group(seed):
  images, labels = constant_images(side=32)
  mixed, targets, lam = CUT(jax.random.key(seed), images, labels)
  partner, own = partners_and_own_weights(targets)
  group = np.arange(BATCH) // SIZE
  mixed = np.asarray(mixed)
  value = np.arange(1.0, BATCH + 1.0)
  for i in range(BATCH):
    pixels = set(np.unique(mixed[i]))
    if partner[i] < 0:  # an empty box (lam 1): unmixed
      assert pixels == {value[i]}
      continue
    assert pixels <= {value[i], value[partner[i]]}, (i, pixels)  # only its own and its partner's pixels
    assert group[partner[i]] == group[i] and partner[i] % SIZE == SIZE - 1 - i % SIZE
    np.testing.assert_allclose(np.mean(mixed[i] == value[i]), own[i], atol=1e-6)  # lam = own pixel share
  np.testing.assert_allclose(own, np.asarray(lam)[group], atol=1e-6)
  boxes = [tuple((mixed[g * SIZE] != value[g * SIZE]).any(-1).ravel()) for g in range(GROUPS)]
  boxes = [box for box in boxes if any(box)]
  assert len(set(boxes)) == len(boxes) >= 2  # each group pastes its own box


def test_one_group_is_the_whole_batch_reversed():
  images, labels = constant_images()
  _, targets, lam = mixup.mixup_cutmix(jax.random.key(0), images, labels, num_classes=BATCH, mixup_alpha=0.8,
                                       cutmix_alpha=0.0, label_smoothing=0.0)
  partner, own = partners_and_own_weights(targets)
  np.testing.assert_array_equal(partner, BATCH - 1 - np.arange(BATCH))
  assert lam.shape == () and np.allclose(own, lam)


@pytest.mark.parametrize("groups", [0, -2, 5, 24, 2.0])
def test_groups_must_divide_the_batch(groups):
  images, labels = constant_images()
  with pytest.raises(ValueError, match=f"mixup_groups={groups!r}.*divides the global batch \\(12\\)"):
    mixup.mixup_cutmix(jax.random.key(0), images, labels, num_classes=BATCH, groups=groups)


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
