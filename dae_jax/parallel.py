"""Where training arrays live: one device, or a 1-D ``data`` mesh over every device.

The train step is the same jitted function either way; only the placement of its
inputs differs. Several processes (hosts) join one mesh: each holds the whole dataset
and the same state, computes the same epoch order, and feeds its own devices their
share of every global batch. With a mesh, parameters, optimizer state and images are replicated
and each step's example indices are split over the ``data`` axis, so XLA partitions
the batch and all-reduces the gradients (no pmap, no second code path).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dae_jax.errors import UserError


def initialize_distributed(environ: Mapping[str, str] = os.environ) -> bool:
    """Joins a multi-process run when a launcher asked for one; call before any JAX op.

    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` name one explicitly; under SLURM with several tasks JAX reads the
    job's own variables; ``DAE_JAX_DISTRIBUTED=1`` lets JAX detect any other cluster it
    knows (TPU pod slices, Open MPI, GKE). CPU processes talk through gloo collectives.
    """
    explicit = "JAX_COORDINATOR_ADDRESS" in environ
    slurm = "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1
    asked = environ.get("DAE_JAX_DISTRIBUTED", "") == "1"
    if not (explicit or slurm or asked):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in environ]
        if missing:
            raise UserError(
                f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not: set all three for a "
                "multi-process run, or none"
            )
        jax.distributed.initialize(
            coordinator_address=environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(environ["JAX_NUM_PROCESSES"]),
            process_id=int(environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    return True


def is_primary() -> bool:
    """Process 0 writes the workdir's files and prints the log."""
    return jax.process_index() == 0


def host(x: jax.Array) -> np.ndarray:
    """An array's whole value on this host, also when it spans processes."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _global(value: Any, sharding: NamedSharding) -> Any:
    """Places a host value that every process holds in full as one global array; each
    process transfers only what its own devices hold."""
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    if jax.dtypes.issubdtype(getattr(value, "dtype", None), jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_global(jax.random.key_data(value), sharding))
    array = host(value) if isinstance(value, jax.Array) else np.asarray(value)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


class Placement:
    """Where a population's arrays live: one device, or a 2-D ``(models, data)`` mesh.

    The models axis takes as many devices as divide both the device count and the
    number of models K (their greatest common divisor); the data axis takes the rest,
    and each step's batch is split over it. K = 1 on 8 devices is plain data
    parallelism; K = 8 on 8 devices puts one model on each device."""

    def __init__(self, mesh: Mesh | None):
        self.mesh = mesh

    @classmethod
    def for_population(cls, num_models: int, data_parallel: bool, batch_size: int) -> Placement:
        devices = jax.devices()
        if len(devices) == 1 and not data_parallel:
            return cls(None)
        models = math.gcd(num_models, len(devices))
        split = len(devices) // models
        if batch_size % split:
            raise UserError(
                f"train.batch_size={batch_size} does not split evenly over {split} devices; "
                f"use a multiple of {split}"
            )
        return cls(Mesh(np.asarray(devices).reshape(models, split), ("models", "data")))

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    def describe(self) -> str:
        if self.mesh is None:
            return f"one device ({jax.devices()[0].device_kind})"
        models, split = self.mesh.devices.shape
        layout = (
            f"data-parallel over {self.mesh.size} devices"
            if models == 1
            else f"{self.mesh.size} devices, {models} model groups x {split} data-parallel"
        )
        return f"{layout} ({jax.devices()[0].device_kind}, {jax.process_count()} process(es))"

    def _put(self, tree: Any, spec: P) -> Any:
        if self.mesh is None:
            return jax.device_put(tree)
        sharding = NamedSharding(self.mesh, spec)
        return jax.tree.map(lambda leaf: _global(leaf, sharding), tree)

    def replicated(self, tree: Any) -> Any:
        """Every device holds all of it (images, evaluation batches)."""
        return self._put(tree, P())

    def per_model(self, tree: Any) -> Any:
        """Arrays with a leading models axis, split over the mesh's ``models`` axis."""
        return self._put(tree, P("models"))

    def orders(self, orders_KxSxB: jax.Array) -> jax.Array:
        """Each model's epoch order, its batches split over the ``data`` axis."""
        return self._put(orders_KxSxB, P("models", None, "data"))
