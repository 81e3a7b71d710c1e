"""Model FLOPs (MaxText convention), the peak table, MFU arithmetic, and throughput fields in the loop."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from simmim_jax.models import flops
from simmim_jax import models
from simmim_jax.train import optim, pretrain
from helpers import fixed_images, read_metrics, run_pretrain, tiny_config


def test_vit_b16_forward_is_17_56_gmac_within_half_a_percent_of_timm():
  encoder = models.create_encoder("vit_base_patch16", img_size=224)
  gmac = flops.vit_forward_flops(encoder) / 2e9
  assert gmac == pytest.approx(17.563, abs=5e-4)
  assert gmac == pytest.approx(17.58, rel=5e-3)  # timm's table (it also counts the classifier)


def test_swin_b_forward_matches_timm_within_one_percent():
  encoder = models.create_encoder("swin_base_patch4_window7")  # 224, window 7
  assert flops.swin_forward_flops(encoder) / 2e9 == pytest.approx(15.47, rel=1e-2)  # timm: 15.47 GMAC


def test_simmim_training_image_is_three_forwards_including_the_head():
  encoder = models.create_encoder("vit_base_patch16", img_size=224)
  model = models.SimMIM(encoder=encoder, encoder_stride=16)
  head = 2 * 196 * 768 * (16 * 16 * 3)
  assert flops.simmim_forward_flops(model) == flops.vit_forward_flops(encoder) + head
  assert flops.train_flops_per_image(model) == 3 * flops.simmim_forward_flops(model)
  assert flops.train_flops_per_image(model) / 1e9 == pytest.approx(106.07, abs=0.01)


def _xla_train_step_flops(model, batch):
  """XLA's FLOP count of one compiled SimMIM train step (forward, backward, AdamW)."""
  tx = optax.adamw(1e-4)
  state = jax.eval_shape(lambda k: pretrain.init_train_state(model, tx, k), jax.random.key(0))
  encoder = model.encoder
  grid = encoder.img_size // encoder.patch_size

  def step(state, images, mask):
    loss_fn = lambda p: model.apply({"params": p}, images, mask, train=True)["loss"]
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state, loss

  images = jax.ShapeDtypeStruct((batch, encoder.img_size, encoder.img_size, 3), jnp.float32)
  mask = jax.ShapeDtypeStruct((batch, grid, grid), jnp.int32)
  return jax.jit(step).lower(state, images, mask).compile().cost_analysis()["flops"]


# XLA counts every op (elementwise, softmax, norms, the optimizer) besides the matmuls, and no input
# gradient for the patch embedding, so it lands a little above the analytic model FLOPs. The extra work is
# O(width) per token against O(width²) for the matmuls: measured +3.7% (ViT width 192) and +7.3% (Swin
# width 96) at batch 8, +17-24% at width 16-32. Widths are chosen where the matmuls dominate; the bound is 10%.
@pytest.mark.parametrize("encoder_name, overrides, stride", [
    ("vit_base_patch16", dict(img_size=32, patch_size=4, embed_dim=192, depth=1, num_heads=3), 4),
    pytest.param("swin_test_tiny", dict(embed_dim=96), 16, marks=pytest.mark.slow),  # 10-30 s compile
])
def test_analytic_flops_agree_with_xla_cost_analysis(encoder_name, overrides, stride):
  model = models.SimMIM(encoder=models.create_encoder(encoder_name, **overrides), encoder_stride=stride)
  batch = 8  # the optimizer update and the bias tables do not scale with the batch
  ratio = _xla_train_step_flops(model, batch) / (batch * flops.train_flops_per_image(model))
  assert 1.0 <= ratio <= 1.10, ratio


@pytest.mark.parametrize("device_kind, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", jnp.bfloat16, 989e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A100-SXM4-80GB", "float32", 156e12),  # TF32 tensor cores
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5p", "bfloat16", 459e12),
    ("TPU v6 lite", "bfloat16", 918e12),
    ("TPU v4", "float32", None),
    ("cpu", "float32", None),
    ("Some Future Accelerator", "bfloat16", None),
])
def test_peak_flops_per_device_table(device_kind, dtype, peak):
  assert flops.peak_flops_per_device(device_kind, dtype) == peak


def test_mfu_arithmetic():
  # ViT-B/16 on an H100 SXM: 4,200 img/s at 105.4 GFLOP/img = 443 TFLOP/s = 44.8% of 989.
  assert flops.mfu(105.4e9, 4200.0, 989e12) == pytest.approx(0.4476, abs=1e-4)
  scalars = flops.throughput_metrics(800.0, 8, 1e12, 200e12)
  assert scalars == pytest.approx({"img_per_sec": 800.0, "img_per_sec_per_device": 100.0,
                                   "tflops_per_device": 100.0, "mfu": 0.5})
  assert "mfu" not in flops.throughput_metrics(800.0, 8, 1e12, None)  # unknown peak: no MFU


@pytest.mark.slow  # the default suite has the same property as test_pretrain's _cache_size() check
def test_train_step_traces_once():
  config = tiny_config()
  model = pretrain.build_model(config)
  tx, schedule = optim.create_optimizer(config)
  step = jax.jit(chex.assert_max_traces(pretrain.make_train_step(config, model, tx, schedule), n=1),
                 donate_argnums=(0,))
  state = pretrain.init_train_state(model, tx, jax.random.key(0))
  images = jnp.asarray(fixed_images())
  for _ in range(3):  # a second trace would raise
    state, step_metrics = step(state, images, jax.random.key(0))
  jax.block_until_ready(step_metrics)


@pytest.mark.slow  # end to end, minutes of the default suite; CI runs it (pytest -m slow)
def test_cli_metrics_carry_throughput_and_model_flops(tmp_path):
  workdir = tmp_path / "run"
  result = run_pretrain(workdir, "--config.total_steps=3", "--config.log_every_steps=1",
                        "--config.checkpoint_every_steps=3", "--config.reconstruction_every_steps=0")
  assert result.returncode == 0, result.stderr[-4000:]
  rows = read_metrics(workdir)
  for row in rows[1:]:  # step 1 compiles: it has no rate
    assert row["img_per_sec"] > 0 and row["img_per_sec_per_device"] == row["img_per_sec"]
    assert row["tflops_per_device"] > 0
    assert "mfu" not in row  # a CPU has no peak in the table


def test_approximate_gelu_is_opt_in_and_off_by_default():
  assert models.create_encoder("vit_base_patch16").approximate_gelu is False  # exact erf GELU, as official
  encoder = models.create_encoder("vit_test_tiny", approximate_gelu=True)
  images = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
  variables = encoder.init(jax.random.key(1), images)
  exact = models.create_encoder("vit_test_tiny").apply(variables, images)["pooled"]
  approx = encoder.apply(variables, images)["pooled"]
  assert not jnp.array_equal(exact, approx) and jnp.allclose(exact, approx, atol=1e-2)
