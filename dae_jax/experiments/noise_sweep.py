"""``dae-jax sweep --grid=noise_sweep``, from an installed package (``--help``: its flags)."""

from dae_jax import sweep

if __name__ == "__main__":
    sweep.script("noise_sweep")
