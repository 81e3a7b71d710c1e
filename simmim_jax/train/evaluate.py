"""Classification evaluation shared by fine-tuning and linear probing: top-k, sums over a batch, the loop.

As the official `validate` (main_finetune.py): top-1 / top-5 accuracy and cross entropy over the whole eval
split. Padded rows of the last batch carry valid = 0 and count nowhere.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """[B] float 1.0 where `labels` is among the k highest logits (k clipped to the number of classes)."""
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def classification_sums(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """Sums over valid rows: top-1 / top-5 correct, cross entropy, count."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return {"top1": jnp.sum(topk_correct(logits, labels, 1) * valid),
          "top5": jnp.sum(topk_correct(logits, labels, 5) * valid),
          "loss": jnp.sum(loss * valid), "count": jnp.sum(valid)}


def evaluate(eval_step: Callable, params: Any, batches, data_sharding) -> dict[str, float]:
  """Runs `eval_step(params, images, labels, valid) -> {suffix: sums}` over `batches`; returns
  {"eval_top1{suffix}", "eval_top5{suffix}", "eval_loss{suffix}"} in percent / mean loss."""
  from simmim_jax import data  # pylint: disable=g-import-not-at-top  (TF-free)

  totals = None
  for batch in batches:
    batch = data.make_global_batch(batch, data_sharding)
    sums = jax.device_get(jax.block_until_ready(eval_step(params, batch["image"], batch["label"], batch["valid"])))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  result = {}
  for suffix, s in totals.items():
    count = max(float(s["count"]), 1.0)
    result.update({f"eval_top1{suffix}": 100.0 * float(s["top1"]) / count,
                   f"eval_top5{suffix}": 100.0 * float(s["top5"]) / count,
                   f"eval_loss{suffix}": float(s["loss"]) / count})
  return result


def hook(config, eval_step: Callable, data_sharding, *, inputs: Callable[[Any], Any] = lambda state: state.params,
         line: Callable[[int, dict], str]):
  """The evaluation hook of fine-tuning and probing: every `config.eval_every_steps` (and at the end), `evaluate`
  over one pass of the eval split (`data.finetune_pipeline.create_eval_iterator`) with `inputs(state)` as the
  step's parameters; reports `line(step, scalars)` and returns the scalars."""
  from simmim_jax.train import run  # pylint: disable=g-import-not-at-top  (run imports nothing of this module)

  def evaluate_state(step, state, batch):
    del batch
    from simmim_jax.data import finetune_pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
    batches = finetune_pipeline.create_eval_iterator(config.data, image_size=config.img_size,
                                                     global_batch_size=config.global_batch_size)
    scalars = evaluate(eval_step, inputs(state), batches, data_sharding)
    run.report(line(step, scalars))
    return run.HookOutput(scalars=scalars)

  return run.Hook(config.eval_every_steps, evaluate_state)
