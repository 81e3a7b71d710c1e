"""evaluate.py: top-k sums on a hand-made example (padded rows count nowhere)."""

import jax.numpy as jnp

from simmim_jax.train import evaluate


def test_top1_and_top5_on_a_hand_made_example():
  logits = jnp.array([[0.0, 5, 4, 3, 2, 1, -1],    # label 1: top-1
                      [0.0, 5, 4, 3, 2, 1, -1],    # label 5: 5th highest -> top-5 only
                      [0.0, 5, 4, 3, 2, 1, -1],    # label 6: neither
                      [9.0, 5, 4, 3, 2, 1, -1]])   # label 0: top-1, but padded (valid 0)
  labels = jnp.array([1, 5, 6, 0])
  sums = evaluate.classification_sums(logits, labels, jnp.array([1.0, 1.0, 1.0, 0.0]))
  assert float(sums["top1"]) == 1 and float(sums["top5"]) == 2 and float(sums["count"]) == 3
