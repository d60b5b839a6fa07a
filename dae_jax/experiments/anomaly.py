"""Anomaly detection with DAEs: train on all classes but one, score test images.

    python experiments/anomaly.py --workdir=runs/anomaly [--quick] [--seeds=0,1,2]
        [--classes=0,1,...] [--config.model.kind=conv]

One DAE per held-out class and seed, all trained in one vmapped program on the other
classes; test images are scored by reconstruction error and by the distance between
the clean image and the denoised corrupted one. Reports AUROC per held-out class and
its mean (mean ± std over seeds), and ROC curves.
"""

from dae_jax import anomaly, report


def define(values):
    from absl import flags

    flags.DEFINE_list("classes", [], "Held-out classes (default: every class).", flag_values=values)


def quick(config):
    config.data.train_size, config.data.test_size = 1024, 512
    config.train.epochs = 1


def run(config, seeds, workdir, quick, command, flags):
    classes = report.numbers("classes", flags.classes, int, "0,6") or None
    if quick and classes is None:
        classes = [0, 1]
        print("--quick set --classes=0,1")
    anomaly.run_experiment(config, seeds, workdir, classes=classes, command=command)


def main(argv=None) -> int:
    """The script (``argv`` None), or its run in this process with ``argv``: the exit code."""
    return report.cli("anomaly", run, quick=quick, define=define, doc=__doc__, argv=argv)


if __name__ == "__main__":
    main()
