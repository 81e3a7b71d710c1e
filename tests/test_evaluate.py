"""evaluate.py: top-k sums on a hand-made example (padded rows count nowhere), and `evaluate`'s totals over an eval
split of several batches, on one device and as global batches over the 8 fake devices."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from simmim_jax.train import evaluate, sharding

ROW = [0.0, 5, 4, 3, 2, 1, -1]  # 7 classes; class 1 ranks first, class 5 fifth, classes 0 and 6 below the top 5


def test_top1_and_top5_on_a_hand_made_example():
  logits = jnp.array([[0.0, 5, 4, 3, 2, 1, -1],    # label 1: top-1
                      [0.0, 5, 4, 3, 2, 1, -1],    # label 5: 5th highest -> top-5 only
                      [0.0, 5, 4, 3, 2, 1, -1],    # label 6: neither
                      [9.0, 5, 4, 3, 2, 1, -1]])   # label 0: top-1, but padded (valid 0)
  labels = jnp.array([1, 5, 6, 0])
  sums = evaluate.classification_sums(logits, labels, jnp.array([1.0, 1.0, 1.0, 0.0]))
  assert float(sums["top1"]) == 1 and float(sums["top5"]) == 2 and float(sums["count"]) == 3


def eval_split() -> list[dict[str, np.ndarray]]:
  """Two batches of 8 rows whose images are their logits: 5 real rows, then padding (valid 0) that would be
  right at top-1 with a large loss if it counted."""
  rows, labels, valid = [ROW] * 16, [0] * 16, [0.0] * 16
  for i, label in [(0, 1), (1, 5), (2, 6), (8, 2), (9, 0)]:  # top-1 | top-5 only | neither | top-5 only | neither
    labels[i], valid[i] = label, 1.0
  rows[3] = [99.0, 5, 4, 3, 2, 1, -1]  # a padded row: right at top-1 (label 0)
  rows[10] = [0.0, 0, 0, 0, 0, 0, 99]  # a padded row: a loss of 99 (label 0)
  images, labels, valid = np.array(rows, np.float32), np.array(labels, np.int32), np.array(valid, np.float32)
  return [{"image": images[i:i + 8], "label": labels[i:i + 8], "valid": valid[i:i + 8]} for i in (0, 8)]


def hand_computed(scale: float) -> tuple[float, float, float]:
  """Top-1 %, top-5 % and mean cross entropy of the 5 real rows at logits `scale` * ROW."""
  log_sum_exp = math.log(sum(math.exp(scale * x) for x in ROW))
  picked = [ROW[label] for label in (1, 5, 6, 2, 0)]  # the label's logit of each real row
  return 100 * 1 / 5, 100 * 3 / 5, sum(log_sum_exp - scale * x for x in picked) / 5


def eval_step(params, images, labels, valid):
  """Two heads, as a probe of two blocks: the logits as they are and doubled."""
  return {"": evaluate.classification_sums(images * params, labels, valid),
          "_block2": evaluate.classification_sums(images * 2 * params, labels, valid)}


def expected_scalars() -> dict[str, float]:
  result = {}
  for suffix, scale in (("", 1.0), ("_block2", 2.0)):
    top1, top5, loss = hand_computed(scale)
    result.update({f"eval_top1{suffix}": top1, f"eval_top5{suffix}": top5, f"eval_loss{suffix}": loss})
  return result


def batch_sharding(devices):
  return sharding.batch_sharding(sharding.create_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1}), devices))


def test_evaluate_totals_every_batch_and_counts_padded_rows_nowhere():
  scalars = evaluate.evaluate(jax.jit(eval_step), 1.0, eval_split(), batch_sharding(jax.devices()[:1]))
  assert scalars == pytest.approx(expected_scalars(), rel=1e-6)


def test_evaluate_steps_on_global_batches_over_8_devices_with_the_same_result():
  data_sharding = batch_sharding(jax.devices()[:8])
  seen = []

  def sharded_step(params, images, labels, valid):
    seen.append((images.shape, images.sharding, labels.sharding, valid.sharding))
    return jax.jit(eval_step)(params, images, labels, valid)

  scalars = evaluate.evaluate(sharded_step, 1.0, eval_split(), data_sharding)
  assert scalars == pytest.approx(expected_scalars(), rel=1e-6)
  assert seen == [((8, 7), data_sharding, data_sharding, data_sharding)] * 2  # 1 row on each of the 8 devices


def test_an_eval_split_of_padding_only_reports_zeros_not_nan():
  batch = {**eval_split()[1], "valid": np.zeros(8, np.float32)}
  scalars = evaluate.evaluate(jax.jit(eval_step), 1.0, [batch], batch_sharding(jax.devices()[:1]))
  assert scalars == {f"eval_{name}{suffix}": 0.0 for suffix in ("", "_block2") for name in ("top1", "top5", "loss")}
