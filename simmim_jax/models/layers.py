"""Building blocks shared by the encoders: initializers, stochastic depth, MLP, relative positions, the
attention modules' common base (`FusedQkvAttention`) and scanned blocks.

Initializers are written out explicitly because the official code's semantics differ from what
`jax.nn.initializers` offers (microsoft/SimMIM `models/vision_transformer.py`:270-271 and :281-292,
`models/simmim.py`:66-67, `models/swin_transformer.py`:547-555):
  * timm's `trunc_normal_(std=.02)` truncates at *absolute* bounds [-2, 2], i.e. it is effectively an
    untruncated N(0, 0.02); JAX's `truncated_normal` truncates at ±2σ and rescales the std.
  * the official SimMIM ViT overrides `_trunc_normal_` to truncate at ±1σ (effective std ≈ 0.0108).
  * PyTorch's default Linear/Conv init (kaiming_uniform(a=√5)) is U(±1/√fan_in), for weight and bias.
"""

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any
Initializer = Callable[..., jax.Array]


def trunc_normal(std: float = 0.02, lower: float = -2.0, upper: float = 2.0, scale: float = 1.0) -> Initializer:
  """N(0, std) truncated at the absolute bounds [lower, upper] (timm `trunc_normal_`), times `scale`."""

  def init(key, shape, dtype=jnp.float32):
    unit = jax.random.truncated_normal(key, lower / std, upper / std, shape, jnp.float32)
    return (unit * (std * scale)).astype(dtype)

  return init


def torch_default_uniform(fan_in_axes: tuple[int, ...]) -> Initializer:
  """PyTorch's default Linear / Conv weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  `fan_in_axes` are the axes of the Flax kernel that make up fan-in (Dense: (0,); Conv HWIO: (0, 1, 2)).
  """

  def init(key, shape, dtype=jnp.float32):
    fan_in = int(np.prod([shape[a] for a in fan_in_axes]))
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

  return init


def torch_default_bias(fan_in: int) -> Initializer:
  """PyTorch's default Linear / Conv bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

  return init


def constant(value: float) -> Initializer:
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.full(shape, value, dtype)

  return init


def apply_to_rows(dense: nn.Dense, x: jax.Array) -> jax.Array:
  """`dense` applied to `x` flattened to [rows, features], then reshaped back; the same math as `dense(x)`.

  A speed lever, not a numerical change: with one contracting dimension the weight gradient is a plain 2-D
  matmul (x^T dy); on [B, N, C] inputs XLA:CPU contracts over both B and N and inserts layout copies
  (tiny ViT train step 11% faster on CPU, BENCHMARKS.md `dense_2d`). Free elsewhere (a bitcast).
  """
  rows = dense(x.reshape(-1, x.shape[-1]))
  return rows.reshape(*x.shape[:-1], rows.shape[-1])


def split_qkv(qkv: jax.Array, num_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A fused projection's output [..., 3 * dim], ordered [q; k; v] with each [head, head_dim] as the
  official `qkv.weight` rows (`reshape(B, N, 3, heads, head_dim)` there), split into q, k, v, each
  [..., num_heads, head_dim].
  """
  *lead, width = qkv.shape
  qkv = qkv.reshape(*lead, 3, num_heads, width // (3 * num_heads))
  return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]


class DropPath(nn.Module):
  """Stochastic depth (per-sample residual dropping, timm `DropPath`); uses the 'dropout' rng."""

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    # `rate` is a traced scalar when the block runs under `scan_blocks` (one rate per scanned block).
    if deterministic or (not isinstance(self.rate, jax.Array) and self.rate == 0.0):
      return x
    keep_prob = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, shape)
    return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros((), x.dtype))


class Mlp(nn.Module):
  """fc1 -> exact (erf) GELU -> [dropout] -> fc2 -> dropout.

  `dropout_after_fc1=True` is timm's `Mlp` (the official Swin / SwinV2 `Mlp`: dropout after the activation
  and after fc2); False drops out after fc2 only, as the official SimMIM / BEiT ViT `Mlp` (microsoft/SimMIM
  `models/vision_transformer.py`: "x = self.drop(x)" after the activation is commented out) and HF's ViT.
  """

  hidden_dim: int
  dropout_rate: float = 0.0
  kernel_init: Initializer = trunc_normal()
  fc2_kernel_init: Initializer | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  approximate_gelu: bool = False  # opt-in tanh GELU: faster on CPU, not the official numerics
  dropout_after_fc1: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    out_dim = x.shape[-1]
    x = apply_to_rows(nn.Dense(self.hidden_dim, kernel_init=self.kernel_init, dtype=self.dtype,
                               param_dtype=self.param_dtype, name="fc1"), x)
    x = nn.gelu(x, approximate=self.approximate_gelu)  # nn.GELU() in PyTorch is the exact erf form.
    if self.dropout_after_fc1:
      x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = apply_to_rows(nn.Dense(out_dim, kernel_init=self.fc2_kernel_init or self.kernel_init, dtype=self.dtype,
                               param_dtype=self.param_dtype, name="fc2"), x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


# ----------------------------------------------------------------------------------------------------
# Attention


# Values of the encoders' `attention_impl` field: "einsum" = explicit q k^T and softmax(.) v einsums with the
# softmax in float32 (the official math, step by step); "dot_product_attention" = `jax.nn.dot_product_attention`
# (cuDNN's fused flash attention on an NVIDIA GPU when the shapes and dtype qualify, its XLA form elsewhere).
ATTENTION_IMPLS = ("einsum", "dot_product_attention")


def check_attention_impl(attention_impl: str, module_name: str) -> None:
  if attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"{module_name}: attention_impl={attention_impl!r} is not one of "
                     f"{', '.join(repr(i) for i in ATTENTION_IMPLS)}")


@functools.cache
def _cuda_compute_capability() -> tuple[int, ...] | None:
  """The first GPU's compute capability when the default backend is CUDA (not ROCm), else None."""
  if jax.default_backend() != "gpu":
    return None
  device = jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  platform_version = getattr(getattr(device, "client", None), "platform_version", "") or ""
  if not capability or "cuda" not in platform_version.lower():
    return None
  return tuple(int(part) for part in str(capability).split("."))


def dot_product_attention_implementation(q: jax.Array, k: jax.Array, bias: jax.Array | None) -> str:
  """The `implementation` for `jax.nn.dot_product_attention`: "cudnn" when this process runs on an NVIDIA
  GPU (Ampere or later) and the call qualifies for cuDNN's flash attention, else "xla".

  The conditions are those `jax.nn.dot_product_attention(implementation="cudnn")` enforces
  (jax/_src/cudnn/fused_attention_stablehlo.py `check_layout` / `check_is_flash_attention`): q, k, v in
  float16 / bfloat16; head_dim a multiple of 8 and <= 128 (256 from Hopper on); with a bias, even query and
  key lengths (its backward pass). So a ViT with a cls token (197 tokens) and a bias, or a Swin window of 7
  (49 tokens), run the XLA form. Decided at trace time: a function exported for "cuda" from a CPU host
  gets the XLA form.
  """
  capability = _cuda_compute_capability()
  if capability is None or capability < (8, 0):
    return "xla"
  head_dim = q.shape[-1]
  max_head_dim = 256 if capability >= (9, 0) else 128
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
    return "xla"
  if head_dim % 8 or head_dim > max_head_dim:
    return "xla"
  if bias is not None and (q.shape[-3] % 2 or k.shape[-3] % 2):
    return "xla"
  return "cudnn"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, *, scale: float,
           attention_impl: str = "einsum", attn_dropout: nn.Dropout | None = None,
           deterministic: bool = True) -> jax.Array:
  """softmax(q k^T * scale + bias) v over [B, N, heads, head_dim] (softmax in float32), by `attention_impl`.

  `bias` broadcasts to [B, heads, N, N] (relative position bias, Swin's shift mask). Active attention
  dropout always takes the einsum path: `jax.nn.dot_product_attention` has no dropout on the weights.
  """
  check_attention_impl(attention_impl, "attend")
  dropout = attn_dropout is not None and attn_dropout.rate > 0.0 and not deterministic
  if attention_impl == "dot_product_attention" and not dropout:
    if bias is not None:
      bias = bias.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale,
                                        implementation=dot_product_attention_implementation(q, k, bias))
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
  if bias is not None:
    logits = logits + bias
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  if dropout:
    weights = attn_dropout(weights, deterministic=False)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class FusedQkvAttention(nn.Module, kw_only=True):
  """What the encoders' attention modules share (ViT `Attention`, Swin `WindowAttention`, SwinV2
  `WindowAttentionV2`): these fields, the fused `qkv` projection (`project_qkv`) and the output path
  (`attend_and_project`). Subclasses add their position bias and query scaling. Fields are keyword-only.
  """

  num_heads: int
  qkv_bias: bool = True
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  kernel_init: Initializer = trunc_normal()
  proj_kernel_init: Initializer | None = None  # None: kernel_init
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"  # see ATTENTION_IMPLS

  def project_qkv(self, x: jax.Array, bias_layout: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`qkv` Dense(3C) on x [B, N, C] -> q, k, v, each [B, N, heads, head_dim] (`split_qkv`).

    With `qkv_bias`, `bias_layout` "qkv" is an ordinary bias on the fused projection (Swin V1, plain ViT);
    "qv" is the BEiT layout (official SimMIM ViT, SwinV2): separate `q_bias` / `v_bias` parameters and a
    k bias fixed at zero.
    """
    dim = x.shape[-1]
    qkv = apply_to_rows(nn.Dense(3 * dim, use_bias=self.qkv_bias and bias_layout == "qkv",
                                 kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name="qkv"), x)
    if self.qkv_bias and bias_layout == "qv":
      q_bias = self.param("q_bias", nn.initializers.zeros, (dim,), self.param_dtype)
      v_bias = self.param("v_bias", nn.initializers.zeros, (dim,), self.param_dtype)
      qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    return split_qkv(qkv, self.num_heads)

  def attend_and_project(self, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, scale: float,
                         deterministic: bool) -> jax.Array:
    """`attend` (attention dropout `attn_drop_rate`), heads merged, `proj` Dense(C), dropout: [B, N, C]."""
    batch, tokens, heads, head_dim = q.shape
    out = attend(q, k, v, bias, scale=scale, attention_impl=self.attention_impl,
                 attn_dropout=nn.Dropout(self.attn_drop_rate), deterministic=deterministic)
    out = apply_to_rows(nn.Dense(heads * head_dim, kernel_init=self.proj_kernel_init or self.kernel_init,
                                 dtype=self.dtype, param_dtype=self.param_dtype, name="proj"),
                        out.reshape(batch, tokens, heads * head_dim))
    return nn.Dropout(self.proj_drop_rate)(out, deterministic=deterministic)


def relative_position_index(height: int, width: int) -> np.ndarray:
  """Swin/BEiT relative position index for a `height x width` token grid: int32 [H*W, H*W].

  Entry (a, b) = (dy + H - 1) * (2W - 1) + (dx + W - 1), with (dy, dx) = coords[a] - coords[b].
  """
  coords = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij")).reshape(2, -1)
  relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)  # [N, N, 2]
  relative[..., 0] += height - 1
  relative[..., 1] += width - 1
  return (relative[..., 0] * (2 * width - 1) + relative[..., 1]).astype(np.int32)


def gather_relative_bias(table: jax.Array, index: np.ndarray) -> jax.Array:
  """A relative position bias table [num_relative, heads] looked up at `index` [N, M] -> [heads, N, M]."""
  bias = table[index.reshape(-1)].reshape(index.shape + table.shape[-1:])
  return jnp.transpose(bias, (2, 0, 1))


def drop_path_rates(drop_path_rate: float, num_blocks: int) -> list[float]:
  """Stochastic depth rising linearly from 0 to `drop_path_rate` (torch.linspace) over all blocks."""
  return [float(r) for r in np.linspace(0.0, drop_path_rate, num_blocks)]


# ----------------------------------------------------------------------------------------------------
# Scanned blocks (the encoders' `scan_blocks` field)


def stack_blocks(params: Mapping[str, Any], names: Sequence[str]) -> Any:
  """Per-block parameter trees `params[names[i]]` (all of one structure) -> one tree whose leaves have a
  leading block axis [len(names), ...]: the layout `jax.lax.scan` iterates over."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *[params[name] for name in names])


def unstack_blocks(stacked: Any, names: Sequence[str]) -> dict[str, Any]:
  """Inverse of `stack_blocks`: {names[i]: the tree of block i}."""
  return {name: jax.tree.map(lambda leaf, i=i: leaf[i], stacked) for i, name in enumerate(names)}


def scan_blocks(parent: nn.Module, block_cls: type[nn.Module], block_fields: Sequence[dict[str, Any]],
                names: Sequence[str], x: jax.Array, args: tuple = (), *, group_size: int = 1,
                remat: bool = False, deterministic: bool = True, needs_rng: bool = False) -> jax.Array:
  """Runs `block_cls(**block_fields[i])` with the parameters `parent` holds under `names[i]`, in order, as
  one `jax.lax.scan` over groups of `group_size` consecutive blocks (MaxText's `scan_layers`): XLA compiles
  one group's body whatever the depth. Each call is `block(x, *args, deterministic=deterministic)`.

  The parameters stay in the unrolled layout (`blocks_0`, `blocks_1`, ...): they are stacked here
  (`stack_blocks`), at run time, so a checkpoint, a converter or an exporter never sees a second layout.
  Within a group the blocks may differ in every field (Swin: unshifted then shifted windows); across groups
  the blocks at one position of the group take the fields of the first group except `drop_path_rate`,
  which is a scanned input (one rate per block). Blocks left over (depth not a multiple of `group_size`)
  run one by one after the scan. With `remat` each block is rematerialized, as `nn.remat` of the unrolled
  model. `needs_rng`: some dropout / drop-path rate is > 0, so each block gets its own 'dropout' key
  (random draws differ from the unrolled model's; deterministic outputs and gradients are equal).
  """
  params = parent.variables["params"]
  # Every rate 0: nothing is random, and a traced drop-path rate of 0 must not ask for a key it has no use for.
  deterministic = deterministic or not needs_rng
  num_groups = len(names) // group_size
  scanned = num_groups * group_size
  keys = jax.random.split(parent.make_rng("dropout"), len(names)) if needs_rng and not deterministic else None

  def block_fn(fields: dict[str, Any]):
    def apply(block_params, x, rate, key):
      block = block_cls(**{**fields, "drop_path_rate": rate}, parent=None)
      rngs = None if key is None else {"dropout": key}
      return block.apply({"params": block_params}, x, *args, deterministic=deterministic, rngs=rngs)
    # Inside a scan, CSE across iterations is no concern (jax.checkpoint's `prevent_cse` docs).
    return jax.checkpoint(apply, prevent_cse=False) if remat else apply

  if num_groups:
    group_fns = [block_fn(block_fields[g]) for g in range(group_size)]

    def body(x, xs):
      group_params, rates, group_keys = xs
      for g, fn in enumerate(group_fns):
        x = fn(group_params[g], x, rates[g], None if group_keys is None else group_keys[g])
      return x, None

    stacked = [stack_blocks(params, names[g:scanned:group_size]) for g in range(group_size)]
    rates = jnp.asarray([[block_fields[i]["drop_path_rate"] for i in range(g, scanned, group_size)]
                         for g in range(group_size)], jnp.float32).T  # [num_groups, group_size]
    group_keys = None if keys is None else keys[:scanned].reshape((num_groups, group_size) + keys.shape[1:])
    x, _ = jax.lax.scan(body, x, (stacked, rates, group_keys))
  for i in range(scanned, len(names)):  # the blocks left over, unscanned
    x = block_fn(block_fields[i])(params[names[i]], x, block_fields[i]["drop_path_rate"],
                                  None if keys is None else keys[i])
  return x


def check_image_size(images: jax.Array, img_size: int, module_name: str) -> None:
  """Raise a clear error when NHWC `images` are not `img_size x img_size` (checked at trace time)."""
  if images.ndim != 4 or images.shape[1] != img_size or images.shape[2] != img_size:
    raise ValueError(
        f"{module_name} expects NHWC images of size {img_size}x{img_size} (img_size={img_size}); "
        f"got an array of shape {tuple(images.shape)}. Set img_size to match the input.")
