"""Device mesh and shardings.

The mesh has two axes: "data" (pure data parallelism) and "fsdp" (data parallel too, and the axis large
parameters and their optimizer state are sharded over). The batch is split over both axes. Parameters are
replicated unless the fsdp axis is larger than 1, in which case each parameter with at least
`min_fsdp_size` elements is sharded along its largest dimension divisible by the fsdp size.
Init is shape-first (`jax.eval_shape`, then `jax.jit(init, out_shardings=...)`) so nothing materializes
unsharded on one device.

Multi-slice (`config.mesh.slices` > 1, several TPU slices joined by the data-centre network, DCN): `data` and
`fsdp` describe one slice (its ICI), and the mesh's "data" axis is `slices x data`, slice-major, so FSDP's
all-gathers and reduce-scatters stay inside a slice and only the data-parallel gradient reduction crosses
DCN (MaxText's `dcn_data_parallelism`; `jax.experimental.mesh_utils.create_hybrid_device_mesh`).
"""

from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes of the mesh, data counting every slice; -1 on one axis takes the remaining devices of
  a slice. Raises if they do not fit."""
  slices = int(mesh_config.get("slices", 1))
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  if slices < 1 or num_devices % slices:
    raise ValueError(f"config.mesh.slices={mesh_config.get('slices')} does not divide the {num_devices} available "
                     f"devices; use the number of slices the devices come from")
  per_slice = num_devices // slices
  if data == -1 and fsdp == -1:
    raise ValueError("config.mesh: at most one of data / fsdp may be -1")
  if fsdp == -1:
    fsdp = per_slice // max(data, 1)
  if data == -1:
    data = per_slice // max(fsdp, 1)
  if data < 1 or fsdp < 1 or data * fsdp != per_slice:
    where = (f"the {per_slice} devices of each of {slices} slices" if slices > 1
             else f"the {num_devices} available devices")
    raise ValueError(f"config.mesh data={mesh_config.data} x fsdp={mesh_config.fsdp} does not match {where}; "
                     f"use -1 on one axis to take the rest")
  return slices * data, fsdp


def create_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  slices = int(mesh_config.get("slices", 1))
  axis_types = (jax.sharding.AxisType.Auto,) * 2  # Auto axes: Linen modules carry no sharding-in-types annotations.
  if slices == 1:
    try:
      return jax.make_mesh(shape, BATCH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:  # v4 / v5p: an axis (fsdp 8 on a 4x4x4 torus) spans two physical axes
      device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
      return Mesh(device_array, BATCH_AXES, axis_types=axis_types)
  per_slice = (shape[0] // slices, shape[1])
  if all(hasattr(d, "slice_index") for d in devices):  # real (or compile-only) TPU slices
    device_array = mesh_utils.create_hybrid_device_mesh(per_slice, (slices, 1), devices,
                                                        allow_split_physical_axes=True)
  else:  # fake CPU devices: consecutive devices form a slice
    device_array = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(device_array, BATCH_AXES, axis_types=axis_types)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_partition_spec(shape: tuple[int, ...], fsdp_size: int, min_fsdp_size: int = 2 ** 14) -> P:
  """Shard the largest dimension divisible by `fsdp_size` over "fsdp"; replicate small arrays."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_fsdp_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, min_fsdp_size: int = 2 ** 14) -> Any:
  """NamedShardings for a (params / optimizer state) tree of arrays or ShapeDtypeStructs."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_partition_spec(tuple(x.shape), fsdp_size, min_fsdp_size)),
      abstract_state)
