"""How does the Gaussian noise level change what a DAE learns?

    python experiments/noise_sweep.py --workdir=runs/noise_sweep [--quick] [--seeds=0,1,2]

Trains the default config at sigma in {0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0} x 3 seeds
(sigma 0 is a plain autoencoder), all levels of a seed-set in one vmapped program;
scores every model at every test sigma against clip / Gaussian blur / median filter
tuned per level, and probes each encoder's codes with logistic regression.
"""

from dae_jax import sweep

LEVELS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)

if __name__ == "__main__":
    sweep.cli("noise_sweep", lambda config: [sweep.Arm("gaussian", config.loss, LEVELS)])
