"""MSE vs binary cross-entropy across the Gaussian noise sweep.

    python experiments/loss_comparison.py --workdir=runs/loss_comparison [--quick]

Both losses at sigma in {0, 0.1, 0.3, 0.5, 1.0} x 3 seeds (5 of the noise sweep's 7
levels, so the 30 models fit in ~15 minutes on 2 CPU cores); scored on the same
PSNR/SSIM/probe evaluation, whatever loss trained the model.
"""

from dae_jax import sweep

LEVELS = (0.0, 0.1, 0.3, 0.5, 1.0)


def main() -> None:
    sweep.cli(
        "loss_comparison",
        lambda config: [sweep.Arm("gaussian", loss, LEVELS) for loss in ("mse", "bce")],
        owns={
            "loss": "this script trains both losses itself",
            "noise.kind": "this script compares losses under Gaussian noise",
        },
        doc=__doc__,
    )


if __name__ == "__main__":
    main()
