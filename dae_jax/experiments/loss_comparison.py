"""``dae-jax sweep --grid=loss_comparison``, from an installed package (``--help``: its flags)."""

from dae_jax import sweep

if __name__ == "__main__":
    sweep.script("loss_comparison")
