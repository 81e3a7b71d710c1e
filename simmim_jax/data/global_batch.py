"""Host batches to global jax.Arrays: each process contributes its own rows of the global batch."""

import jax


def make_global_batch(local_batch, sharding: jax.sharding.Sharding):
  """Assembles a global jax.Array per leaf from this process's rows.

  `local_batch` is a pytree of numpy arrays holding this process's `global_batch_size // process_count` rows
  (what `create_pretrain_iterator` yields); `sharding` is the batch sharding of every leaf, e.g.
  `NamedSharding(mesh, P("data"))`. The result has the global batch as its leading dimension.
  """
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
