"""A/B of CPU speed levers on a preset's real train step (default: tiny), interleaved in one process.

  python benchmarks/cpu_levers.py --rounds 3 --steps 4

Variants (each compiled once, then timed round-robin so machine load hits all alike):
  baseline    the model as shipped (jax.nn.dot_product_attention, exact GELU, float32)
  einsum_attn attention as explicit einsum + float32 softmax (monkeypatched in for the experiment)
  tanh_gelu   tanh-approximate GELU (changes numerics: never the default)
  heads_first_attn  attention with q, k, v transposed to [B, heads, N, head_dim] before the matmuls
  dense_2d    every Dense applied to its input flattened to [batch x tokens, features] (one contracting
              dimension in the weight gradient)
  erf_gelu    exact GELU written with erf, 0.5 x (1 + erf(x / sqrt 2)), as PyTorch's nn.GELU, instead of
              jax.nn.gelu's erfc form (XLA:CPU expands erfc into two branches and selects)
  recompute_gelu  exact GELU whose gradient recomputes erfc from x (jax.custom_vjp saving only x) instead
              of autodiff saving erfc's output: one [tokens, 4 dim] array less written and read per block
  remat_gelu  exact GELU under jax.checkpoint (the same saving through remat, which keeps forward-mode AD)
  split_qkv   q, k, v split off the fused projection's last axis (jnp.split: the gradient is one concatenate)
              instead of layers.split_qkv's indexing of a [B, N, 3, heads, head_dim] view (three padded slices
              summed)
  bf16        bfloat16 compute, float32 params (XLA:CPU has no AMX path: expected slower)
Also prints where the time goes: forward only, forward + backward, and the full step (+ AdamW), and
XLA's FLOP / byte counts of the compiled step.
"""

import argparse
import json
import statistics
import sys
import os
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simmim_jax import host_memory  # pylint: disable=g-import-not-at-top

# Before JAX is imported, as simmim-pretrain does on a CPU-only machine (simmim_jax/host_memory.py).
host_memory.configure_for_cpu_only()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
from flax import linen as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput  # pylint: disable=g-import-not-at-top
from simmim_jax import masking  # pylint: disable=g-import-not-at-top
from simmim_jax.models import layers  # pylint: disable=g-import-not-at-top


def einsum_attention(q, k, v, bias=None, mask=None, *, scale=None, **unused):
  del mask, unused
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
  if bias is not None:
    logits = logits + bias
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def heads_first_attention(q, k, v, bias=None, mask=None, *, scale=None, **unused):
  """Attention with the heads moved next to the batch ([B, H, N, D]) before both matmuls, so that every
  dot has leading batch dimensions (XLA:CPU otherwise copies around each batched dot)."""
  del mask, unused
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q * jnp.asarray(scale, q.dtype), k, v))
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k)
  if bias is not None:
    logits = logits + bias
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
  return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", weights, v), 1, 2)


@jax.custom_vjp
def recompute_gelu(x):
  return jax.nn.gelu(x, approximate=False)


def _recompute_gelu_fwd(x):
  return recompute_gelu(x), x


def _recompute_gelu_bwd(x, grad):
  cdf = 0.5 * jax.lax.erfc(-x * (0.5 ** 0.5))
  pdf = jnp.exp(-0.5 * x * x) * (2 * jnp.pi) ** -0.5
  return (grad * (cdf + x * pdf),)


recompute_gelu.defvjp(_recompute_gelu_fwd, _recompute_gelu_bwd)


def split_qkv_last_axis(qkv, num_heads):
  *lead, width = qkv.shape
  return tuple(t.reshape(*lead, num_heads, width // (3 * num_heads)) for t in jnp.split(qkv, 3, axis=-1))


def build(variant: str, spec: dict):
  original_attention, original_gelu = jax.nn.dot_product_attention, nn.gelu
  original_split_qkv = layers.split_qkv
  original_dense_call = nn.Dense.__call__
  try:
    if variant == "dense_2d":
      def dense_2d(self, inputs):
        lead = inputs.shape[:-1]
        return original_dense_call(self, inputs.reshape(-1, inputs.shape[-1])).reshape(*lead, -1)
      nn.Dense.__call__ = dense_2d
    if variant == "einsum_attn":
      jax.nn.dot_product_attention = einsum_attention
    if variant == "heads_first_attn":
      jax.nn.dot_product_attention = heads_first_attention
    if variant == "tanh_gelu":
      nn.gelu = lambda x, approximate=False: original_gelu(x, approximate=True)
    if variant == "recompute_gelu":
      nn.gelu = lambda x, approximate=False: recompute_gelu(x)
    if variant == "remat_gelu":
      nn.gelu = jax.checkpoint(lambda x, approximate=False: original_gelu(x, approximate=False))
    if variant == "split_qkv":
      layers.split_qkv = split_qkv_last_axis
    if variant == "erf_gelu":
      nn.gelu = lambda x, approximate=False: 0.5 * x * (1.0 + jax.lax.erf(x * (0.5 ** 0.5)))
    spec = dict(spec, dtype="bfloat16" if variant == "bf16" else spec["dtype"])
    return train_throughput.JaxStep(spec)  # traced and compiled here, under the patch
  finally:
    jax.nn.dot_product_attention, nn.gelu = original_attention, original_gelu
    nn.Dense.__call__ = original_dense_call
    layers.split_qkv = original_split_qkv


def phase_steps(step: train_throughput.JaxStep, spec: dict):
  """Forward-only and forward+backward of the same model, to split the step's time."""
  model = step.model
  config = train_throughput.make_config(spec)
  mask = masking.random_mask(jax.random.key(3), spec["batch"], input_size=spec["img_size"],
                             mask_patch_size=config.mask_patch_size, model_patch_size=spec["patch_size"],
                             mask_ratio=config.mask_ratio)
  loss = lambda p: model.apply({"params": p}, step.images, mask, train=True)["loss"]
  forward = jax.jit(loss).lower(step.state.params).compile()
  backward = jax.jit(jax.value_and_grad(loss)).lower(step.state.params).compile()
  return {"forward": lambda: forward(step.state.params),
          "forward_backward": lambda: backward(step.state.params)}


def time_calls(fn, n):
  times = []
  for _ in range(n):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--variants", default="baseline,einsum_attn,tanh_gelu,bf16")
  parser.add_argument("--preset", choices=sorted(train_throughput.PRESETS), default="tiny")
  parser.add_argument("--no_phases", action="store_true",
                      help="skip the forward-only / forward+backward split (more rounds in the same time)")
  args = parser.parse_args()
  spec = train_throughput.PRESETS[args.preset]
  steps = {v: build(v, spec) for v in args.variants.split(",")}
  base = steps.get("baseline") or next(iter(steps.values()))
  cost = base.compiled.cost_analysis()
  print(json.dumps({"xla_flops": cost.get("flops"), "xla_bytes_accessed": cost.get("bytes accessed"),
                    "xla_transcendentals": cost.get("transcendentals")}), flush=True)
  phases = {} if args.no_phases else phase_steps(base, spec)
  for fn in phases.values():
    time_calls(fn, 1)
  for step in steps.values():
    step.run(1)
  results = {name: [] for name in list(steps) + list(phases)}
  for _ in range(args.rounds):
    for name, step in steps.items():
      results[name] += step.run(args.steps)
    for name, fn in phases.items():
      results[name] += time_calls(fn, args.steps)
    print(json.dumps({k: round(statistics.median(v[-args.steps:]), 3) for k, v in results.items()}),
          flush=True)
  summary = {name: {"median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3),
                    "max_s": round(max(t), 3), "img_per_sec": round(spec["batch"] / statistics.median(t), 1)}
             for name, t in results.items()}
  summary["load_avg_1m"] = os.getloadavg()[0]
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  main()
