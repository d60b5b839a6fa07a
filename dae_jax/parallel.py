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
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dae_jax.errors import UserError

DEFAULT_COORDINATOR_TIMEOUT = (
    60  # seconds; DAE_JAX_COORDINATOR_TIMEOUT overrides it (issue 21: <= 60)
)
_WAIT_NOTICE_SECONDS = 10


def _int_variable(environ: Mapping[str, str], name: str, low: int, high: int, what: str) -> int:
    raw = environ[name]
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        bounds = f">= {low}" if high == sys.maxsize else f"from {low} to {high}"
        raise UserError(
            f"{name}={raw} is invalid: it must be {what}, an integer {bounds}; "
            "fix or unset the launcher's variables"
        )
    return value


def _coordinator_address(address: str) -> str:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(
            f"JAX_COORDINATOR_ADDRESS={address} is invalid: it must be HOST:PORT of process 0, "
            "e.g. host0:1234"
        )
    return address


def _port_is_free(port: int) -> bool:
    """Whether this host can listen on ``port`` (JAX's coordinator crashes when it cannot)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT is fine
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _bounded(join: Callable[[], None], timeout: int, waiting_for: str, advice: str) -> None:
    """Runs ``join`` (jax.distributed.initialize), saying after a few seconds what it waits
    for; past ``timeout`` seconds the process ends with one line and exit code 1 (JAX itself
    would abort with a C++ stack trace, which Python cannot catch)."""
    done = threading.Event()

    def notice() -> None:
        notice_at = min(_WAIT_NOTICE_SECONDS, timeout)
        if not done.wait(notice_at):
            if timeout > notice_at:
                print(
                    f"Waiting for {waiting_for} (up to {timeout} s; "
                    "DAE_JAX_COORDINATOR_TIMEOUT=SECONDS changes it)",
                    file=sys.stderr,
                    flush=True,
                )
            if not done.wait(timeout - notice_at):
                print(
                    f"error: gave up after {timeout} s waiting for {waiting_for}; {advice}",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    threading.Thread(target=notice, daemon=True, name="dae-jax-coordinator-wait").start()
    try:
        join()
    finally:
        done.set()


def initialize_distributed(environ: Mapping[str, str] = os.environ) -> bool:
    """Joins a multi-process run when a launcher asked for one; call before any JAX op.

    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` name one explicitly; under SLURM with several tasks JAX reads the
    job's own variables; ``DAE_JAX_DISTRIBUTED=1`` lets JAX detect any other cluster it
    knows (TPU pod slices, Open MPI, GKE). CPU processes talk through gloo collectives.
    Joining waits at most ``DAE_JAX_COORDINATOR_TIMEOUT`` seconds (default 60), then
    ends the process with one line on stderr and exit code 1. A bad variable is a
    ``UserError``.
    """
    explicit = "JAX_COORDINATOR_ADDRESS" in environ
    slurm = "SLURM_JOB_ID" in environ and "SLURM_NTASKS" in environ
    if slurm:
        slurm = _int_variable(environ, "SLURM_NTASKS", 1, sys.maxsize, "the number of tasks") > 1
    asked = environ.get("DAE_JAX_DISTRIBUTED", "") == "1"
    if not (explicit or slurm or asked):
        return False
    timeout = DEFAULT_COORDINATOR_TIMEOUT
    if "DAE_JAX_COORDINATOR_TIMEOUT" in environ:
        timeout = _int_variable(
            environ, "DAE_JAX_COORDINATOR_TIMEOUT", 1, 10**6, "seconds to wait for the others"
        )
    # JAX's own deadline comes later than ours, so ours ends the wait with a clear line.
    jax_timeout = timeout + 60
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        _join_explicit(environ, timeout, jax_timeout)
    else:
        _join_detected(environ, slurm, timeout, jax_timeout)
    return True


def _join_explicit(environ: Mapping[str, str], timeout: int, jax_timeout: int) -> None:
    """Joins the run that JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID name."""
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in environ]
    if missing:
        raise UserError(
            f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: set all three for a "
            "multi-process run, or none"
        )
    address = _coordinator_address(environ["JAX_COORDINATOR_ADDRESS"])
    num_processes = _int_variable(
        environ, "JAX_NUM_PROCESSES", 1, 1 << 20, "the number of processes"
    )
    process_id = _int_variable(
        environ, "JAX_PROCESS_ID", 0, num_processes - 1, "this process's index"
    )
    port = int(address.rpartition(":")[2])
    if process_id == 0 and not _port_is_free(port):
        raise UserError(
            f"port {port} of JAX_COORDINATOR_ADDRESS={address} is in use on this host, "
            "where process 0 must listen; pick a free port for every process",
            exit_code=1,
        )
    if process_id == 0:
        waiting_for = f"the other {num_processes - 1} process(es) to join at {address}"
        advice = (
            "start them all with the same JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES "
            f"and JAX_PROCESS_ID from 1 to {num_processes - 1}, or wait longer with "
            "DAE_JAX_COORDINATOR_TIMEOUT=SECONDS"
        )
    else:
        waiting_for = f"process 0 (the coordinator) at {address} and the others"
        advice = (
            "start process 0 (JAX_PROCESS_ID=0) on that host, check "
            "JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES, or wait longer with "
            "DAE_JAX_COORDINATOR_TIMEOUT=SECONDS"
        )
    _bounded(
        lambda: jax.distributed.initialize(
            coordinator_address=address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=jax_timeout,
        ),
        timeout,
        waiting_for,
        advice,
    )


def _join_detected(environ: Mapping[str, str], slurm: bool, timeout: int, jax_timeout: int) -> None:
    """Joins the cluster job JAX detects (SLURM, or any with ``DAE_JAX_DISTRIBUTED=1``)."""
    why = f"SLURM_NTASKS={environ['SLURM_NTASKS']}" if slurm else "DAE_JAX_DISTRIBUTED=1"
    try:
        _bounded(
            lambda: jax.distributed.initialize(initialization_timeout=jax_timeout),
            timeout,
            "every process of the cluster job to join",
            "check that the launcher started all of them, or wait longer with "
            "DAE_JAX_COORDINATOR_TIMEOUT=SECONDS",
        )
    except (ValueError, RuntimeError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"{why} asks for a multi-process run, but JAX finds none to join here "
            f"({reason}); start every process with the cluster's launcher (srun, mpirun, "
            "--worker=all on a TPU pod) or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES "
            "and JAX_PROCESS_ID",
            exit_code=1,
        ) from None


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
