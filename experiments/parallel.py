"""Data parallelism over every device: a 1-D mesh, the batch sharded, parameters
replicated (jax.sharding). With one device nothing is placed specially.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize` when the config
asks for it. Every process builds the same global batch (the data pipeline is
deterministic in the seed and the step) and `jax.make_array_from_callback` hands each
process only the rows of its own devices, so one code path serves one device, many
local devices, and many hosts. Only process 0 writes files.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

_initialized = False


def initialize_distributed(cfg) -> None:
    """`jax.distributed.initialize` from a DistributedConfig, once, when enabled."""
    global _initialized
    if not cfg.enabled or _initialized:
        return
    kwargs = {
        name: getattr(cfg, name)
        for name in ("coordinator_address", "num_processes", "process_id", "local_device_ids")
        if getattr(cfg, name) is not None
    }
    jax.distributed.initialize(**kwargs)
    _initialized = True


class DataParallel:
    """Places batches (sharded along axis 0) and state (replicated) on all devices."""

    axis = "data"

    def __init__(self, devices=None):
        self.devices = list(jax.devices() if devices is None else devices)
        self.size = len(self.devices)
        self.mesh = Mesh(np.array(self.devices), (self.axis,)) if self.size > 1 else None
        self.is_main = jax.process_index() == 0

    @property
    def active(self) -> bool:
        return self.mesh is not None

    def _place(self, tree, spec):
        if not self.active:
            return jax.tree_util.tree_map(
                lambda x: jax.device_put(x) if _is_array(x) else x, tree
            )
        sharding = NamedSharding(self.mesh, spec)

        def place(x):
            if not _is_array(x):
                return x
            host = to_numpy(x)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

        return jax.tree_util.tree_map(place, tree)

    def shard_batch(self, batch):
        """Every array leaf split along its leading (batch) axis over the devices."""
        if self.active:
            for leaf in jax.tree_util.tree_leaves(batch):
                if _is_array(leaf) and (np.ndim(leaf) == 0 or np.shape(leaf)[0] % self.size):
                    raise ValueError(
                        f"a batch of shape {np.shape(leaf)} cannot be split over "
                        f"{self.size} devices: the batch size must be a multiple of it"
                    )
        return self._place(batch, P(self.axis))

    def replicate(self, tree):
        """Every array leaf copied to every device."""
        return self._place(tree, P())

    def constrain_replicated(self, tree):
        """Inside jit: ask for replicated outputs (a no-op on one device)."""
        if not self.active:
            return tree
        sharding = NamedSharding(self.mesh, P())
        return jax.tree_util.tree_map(
            lambda x: jax.lax.with_sharding_constraint(x, sharding)
            if isinstance(x, jax.Array) else x,
            tree,
        )


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def to_numpy(x):
    """A host copy of the whole array on any process: a replicated array's local copy,
    a sharded one gathered from every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
