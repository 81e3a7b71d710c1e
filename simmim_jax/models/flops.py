"""Model FLOPs per training image, peak FLOP/s per device, and MFU (the MaxText convention).

What is counted (analytic "model FLOPs", AI-Hypercomputer/maxtext `docs/reference/performance_metrics.md`):
  * every matrix product as 2·m·n·k: the patch-embedding convolution (a matmul over p·p·C inputs), the
    q/k/v and output projections, q·kᵀ and attention·v, both MLP layers, Swin's PatchMerging reduction,
    and the SimMIM head (the 1x1 conv to stride²·C values per output position);
  * training = 3 x forward (forward, gradient w.r.t. activations, gradient w.r.t. weights), for every
    matmul including attention, as MaxText. (The patch embedding needs no input gradient, so its real
    backward is 1x rather than 2x; that is < 1% of a ViT-B step and we keep the uniform convention.)
What is not counted: rematerialization (remat re-runs the forward; those are "hardware FLOPs", which
XLA's `cost_analysis()` includes), elementwise ops (GELU, residual adds, mask-token blend, layer scale,
biases), softmax, LayerNorm, the L1 loss, the optimizer update, and parameter-only computations that do
not scale with the batch (relative-position-bias gathers, SwinV2's `cpb_mlp` over its coordinate table).

ViT-B/16 at 224 (N = 197 tokens, D = 768, 12 layers): 17.56 GMAC forward, timm lists 17.58; a SimMIM
training image costs 3 x 35.1 = 105.4 GFLOP. (Per layer 24·N·D² for q/k/v, projection and MLP plus 4·N²·D for
attention, and 0.23 GFLOP of patch embedding. timm's figure: the `vit_base_patch16_224` row, `infer_gmacs`, of
huggingface/pytorch-image-models `results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv`.)

MFU = achieved model FLOP/s per device / the device's peak dense FLOP/s for the compute dtype.
"""

from typing import Any

# Peak dense matmul FLOP/s per JAX device, by compute dtype. Keys are matched against
# `jax.devices()[0].device_kind` lowercased, first match wins (so the specific rows come first).
# "float32" on NVIDIA GPUs is the TF32 tensor-core rate (XLA's default precision for float32 dots);
# TPUs have no float32 matmul unit (float32 dots run as several bf16 passes): None.
_PEAKS: tuple[tuple[str, dict[str, float | None]], ...] = (
    # NVIDIA datasheets, dense (no sparsity: half the "with sparsity" figures). Device kinds as CUDA names
    # them, e.g. "NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA L4".
    ("gb200", {"bfloat16": 2500e12, "float32": 1250e12}),        # GB200 (per GPU)
    ("b200", {"bfloat16": 2250e12, "float32": 1100e12}),         # HGX B200
    ("h100 pcie", {"bfloat16": 756e12, "float32": 378e12}),      # H100 PCIe
    ("h100 nvl", {"bfloat16": 835e12, "float32": 418e12}),       # H100 NVL
    ("h100", {"bfloat16": 989e12, "float32": 494.5e12}),         # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("h200 nvl", {"bfloat16": 835e12, "float32": 418e12}),       # H200 NVL
    ("gh200", {"bfloat16": 989e12, "float32": 494.5e12}),        # GH200
    ("h200", {"bfloat16": 989e12, "float32": 494.5e12}),         # H200 SXM (same compute as H100 SXM)
    ("h800", {"bfloat16": 989e12, "float32": 494.5e12}),         # H800 SXM
    ("a100", {"bfloat16": 312e12, "float32": 156e12}),           # A100 SXM / PCIe
    ("a800", {"bfloat16": 312e12, "float32": 156e12}),           # A800
    ("l40s", {"bfloat16": 362e12, "float32": 183e12}),           # L40S
    ("l40", {"bfloat16": 181e12, "float32": 90.5e12}),           # L40
    ("l4", {"bfloat16": 121e12, "float32": 60e12}),              # L4
    ("a40", {"bfloat16": 150e12, "float32": 75e12}),             # A40
    ("a10g", {"bfloat16": None, "float32": None}),               # A10G (AWS): NVIDIA publishes no figure
    ("a10", {"bfloat16": 125e12, "float32": 62.5e12}),           # A10
    ("rtx 6000 ada", {"bfloat16": 364e12, "float32": 182e12}),   # RTX 6000 Ada (FP32 accumulate)
    # Google Cloud TPU docs / MaxText `accelerator_to_spec_map`; one JAX device per chip unless noted.
    ("tpu v6", {"bfloat16": 918e12, "float32": None}),           # v6e (Trillium), "TPU v6 lite"
    ("tpu v5 lite", {"bfloat16": 197e12, "float32": None}),      # v5e
    ("tpu v5e", {"bfloat16": 197e12, "float32": None}),
    ("tpu v5", {"bfloat16": 459e12, "float32": None}),           # v5p ("TPU v5" / "TPU v5p")
    ("tpu v4", {"bfloat16": 275e12, "float32": None}),           # v4 (megacore: one device per chip)
    ("tpu v3", {"bfloat16": 61.5e12, "float32": None}),          # v3: 123 per chip, one device per core
)


def peak_flops_per_device(device_kind: str, dtype: Any = "bfloat16") -> float | None:
  """Peak dense FLOP/s of one JAX device of `device_kind` for compute `dtype`; None when unknown.

  `dtype` is a name ("bfloat16", "float32") or a dtype. CPUs are None: their practical limit is measured
  (`benchmarks/train_throughput.py` reports the dense-matmul FLOP/s of the machine instead).
  """
  name = getattr(dtype, "__name__", None) or getattr(dtype, "name", None) or str(dtype)
  kind = device_kind.lower()
  for key, peaks in _PEAKS:
    if key in kind:
      return peaks.get(name)
  return None


# ----------------------------------------------------------------------------------------------------
# Forward FLOPs per image, by encoder family


def _matmul(m: int, k: int, n: int) -> int:
  return 2 * m * k * n


def _attention_block(tokens: int, dim: int, hidden: int, window_tokens: int) -> int:
  """One pre/post-norm transformer block on `tokens` tokens attending within groups of `window_tokens`."""
  projections = _matmul(tokens, dim, 3 * dim) + _matmul(tokens, dim, dim)  # qkv, proj
  attention = 2 * _matmul(tokens, dim, window_tokens)                      # q kᵀ and attn v, all heads
  mlp = _matmul(tokens, dim, hidden) + _matmul(tokens, hidden, dim)
  return projections + attention + mlp


def vit_forward_flops(encoder) -> int:
  """Forward FLOPs of a `VisionTransformer` for one image (cls token included, head excluded)."""
  grid = encoder.img_size // encoder.patch_size
  patches, dim = grid * grid, encoder.embed_dim
  tokens = patches + 1
  patch_embed = _matmul(patches, encoder.in_chans * encoder.patch_size ** 2, dim)
  block = _attention_block(tokens, dim, int(dim * encoder.mlp_ratio), tokens)
  return patch_embed + encoder.depth * block


def swin_forward_flops(encoder) -> int:
  """Forward FLOPs of a `SwinTransformer` / `SwinTransformerV2` for one image (head excluded)."""
  from simmim_jax.models import swin  # pylint: disable=g-import-not-at-top
  resolution = encoder.img_size // encoder.patch_size
  dim = encoder.embed_dim
  total = _matmul(resolution ** 2, encoder.in_chans * encoder.patch_size ** 2, dim)
  for stage, depth in enumerate(encoder.depths):
    window, _ = swin.effective_window(resolution, encoder.window_size, 0)
    block = _attention_block(resolution ** 2, dim, int(dim * encoder.mlp_ratio), window ** 2)
    total += depth * block
    if stage < len(encoder.depths) - 1:  # PatchMerging: 4C -> 2C on the halved grid
      resolution //= 2
      total += _matmul(resolution ** 2, 4 * dim, 2 * dim)
      dim *= 2
  return total


def encoder_forward_flops(encoder) -> int:
  from simmim_jax.models import swin, vit  # pylint: disable=g-import-not-at-top
  if isinstance(encoder, vit.VisionTransformer):
    return vit_forward_flops(encoder)
  if isinstance(encoder, swin.SwinTransformer):  # V2 is a subclass: same matmuls
    return swin_forward_flops(encoder)
  raise TypeError(f"no FLOP model for encoder {type(encoder).__name__}")


def simmim_forward_flops(model) -> int:
  """Forward FLOPs of a `models.SimMIM` for one image: encoder + the linear head."""
  encoder = model.encoder
  grid = encoder.img_size // model.encoder_stride
  head = _matmul(grid * grid, encoder.num_features, model.encoder_stride ** 2 * model.in_chans)
  return encoder_forward_flops(encoder) + head


def train_flops_per_image(model) -> int:
  """Model FLOPs of one SimMIM training image: 3 x forward (remat not counted)."""
  return 3 * simmim_forward_flops(model)


# ----------------------------------------------------------------------------------------------------
# Throughput and MFU


def mfu(flops_per_image: float, img_per_sec_per_device: float, peak_flops: float) -> float:
  """Model FLOPs utilization: achieved model FLOP/s per device over the device's peak FLOP/s."""
  return flops_per_image * img_per_sec_per_device / peak_flops


def throughput_metrics(img_per_sec: float, num_devices: int, flops_per_image: float | None,
                       peak_flops: float | None) -> dict[str, float]:
  """The throughput scalars of a log step: img_per_sec (global), img_per_sec_per_device,
  tflops_per_device (when the FLOPs are known) and mfu (when the device's peak is known too)."""
  per_device = img_per_sec / num_devices
  scalars = {"img_per_sec": img_per_sec, "img_per_sec_per_device": per_device}
  if flops_per_image:
    scalars["tflops_per_device"] = flops_per_image * per_device / 1e12
    if peak_flops:
      scalars["mfu"] = mfu(flops_per_image, per_device, peak_flops)
  return scalars
