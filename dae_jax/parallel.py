"""Where training arrays live: one device, or a 1-D ``data`` mesh over every device.

The train step is the same jitted function either way; only the placement of its
inputs differs. With a mesh, parameters, optimizer state and images are replicated
and each step's example indices are split over the ``data`` axis, so XLA partitions
the batch and all-reduces the gradients (no pmap, no second code path).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dae_jax.errors import UserError


class Placement:
    def __init__(self, mesh: Mesh | None):
        self.mesh = mesh

    @classmethod
    def for_training(cls, data_parallel: bool, batch_size: int) -> Placement:
        """A mesh over all devices when there are several (or ``data_parallel``)."""
        devices = jax.devices()
        if len(devices) == 1 and not data_parallel:
            return cls(None)
        if batch_size % len(devices):
            raise UserError(
                f"train.batch_size={batch_size} does not split evenly over {len(devices)} "
                f"devices; use a multiple of {len(devices)}"
            )
        return cls(Mesh(np.asarray(devices), ("data",)))

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    def describe(self) -> str:
        if self.mesh is None:
            return f"one device ({jax.devices()[0].device_kind})"
        return (
            f"data-parallel over {self.mesh.size} devices "
            f"({jax.devices()[0].device_kind}, {jax.process_count()} process(es))"
        )

    def replicated(self, tree: Any) -> Any:
        """Every device holds all of it (parameters, optimizer state, images, keys)."""
        if self.mesh is None:
            return jax.device_put(tree)
        return jax.device_put(tree, NamedSharding(self.mesh, P()))

    def split_batches(self, order_SxB: jax.Array) -> jax.Array:
        """Each step's example indices split over the devices along the batch axis."""
        if self.mesh is None:
            return order_SxB
        return jax.device_put(order_SxB, NamedSharding(self.mesh, P(None, "data")))
