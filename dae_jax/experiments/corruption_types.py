"""``dae-jax sweep --grid=corruption_types``, from an installed package (``--help``: its flags)."""

from dae_jax import sweep

if __name__ == "__main__":
    sweep.script("corruption_types")
