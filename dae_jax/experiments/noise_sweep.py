"""How does the noise level change what a DAE learns?

    python experiments/noise_sweep.py --workdir=runs/noise_sweep [--quick] [--seeds=0,1,2]
        [--levels=0,0.1,0.2,0.3,0.5,0.75,1] [--learning_rates=1e-3] [--config.noise.kind=gaussian]

Trains the default config at sigma in {0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0} x 3 seeds
(sigma 0 is a plain autoencoder), every model in one vmapped program; scores every
model at every test sigma against clip / Gaussian blur / median filter / BM3D tuned
per level, and probes each encoder's codes with logistic regression (L-BFGS). The noise kind is
the config's (``--config.noise.kind``; Gaussian by default). Killed, the same
command resumes it.
"""

from dae_jax import sweep

LEVELS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


def main() -> None:
    sweep.cli(
        "noise_sweep",
        lambda config: [sweep.Arm(config.noise.kind, config.loss, LEVELS)],
        doc=__doc__,
    )


if __name__ == "__main__":
    main()
