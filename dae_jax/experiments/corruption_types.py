"""Gaussian vs masking vs salt-and-pepper corruption, each over its own levels.

    python experiments/corruption_types.py --workdir=runs/corruption_types [--quick]

Gaussian: sigma in {0.1, 0.25, 0.5}; masking and salt-and-pepper: fraction of pixels
in {0.1, 0.25, 0.5}; 3 seeds each. Same evaluation and outputs as noise_sweep.py.
"""

from dae_jax import sweep

LEVELS = (0.1, 0.25, 0.5)


def main() -> None:
    sweep.cli(
        "corruption_types",
        lambda config: [
            sweep.Arm(kind, config.loss, LEVELS)
            for kind in ("gaussian", "masking", "salt_and_pepper")
        ],
        owns={"noise.kind": "this script trains every noise kind itself"},
        doc=__doc__,
    )


if __name__ == "__main__":
    main()
