"""``python -m dae_jax`` is the ``dae-jax`` command."""

from dae_jax.cli import run

run()
