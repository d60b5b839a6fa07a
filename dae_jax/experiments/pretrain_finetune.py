"""Does DAE pre-training help a classifier, and when?

    python experiments/pretrain_finetune.py --workdir=runs/pretrain_finetune [--quick]
        [--seeds=0,1,2] [--label_fractions=0.01,0.1,1] [--config.model.kind=conv]

The seed network (784-512-256-128 encoder) plus a softmax head, fine-tuned with 1%,
10% and 100% of the training labels from: (a) random initialisation; greedy layer-wise
pre-training (Vincent et al. 2010) as (b) plain autoencoders, (c) DAEs with masking
and with Gaussian noise; end-to-end pre-training of the whole DAE (no stacking) as a
plain AE and as the config's DAE. Each fine-tuning keeps its best epoch on held-out
training images; the table reports test accuracy, mean ± std over seeds. With
``--config.model.kind=conv`` the stacked variants are skipped (stacking is defined
for the MLP).
"""

from dae_jax import pretrain, report


def define(values):
    from absl import flags

    kw = {"flag_values": values}
    flags.DEFINE_list(
        "label_fractions", ["0.01", "0.1", "1"], "Fractions of labels to fine-tune on.", **kw
    )
    flags.DEFINE_integer("pretrain_epochs", 10, "Epochs per stacked layer, and end-to-end.", **kw)
    flags.DEFINE_integer(
        "finetune_epochs", 20, "Fine-tuning epochs with all labels (x10 at <=10%).", **kw
    )
    flags.DEFINE_integer("val_size", 5000, "Training images held out for choosing the epoch.", **kw)
    flags.DEFINE_float(
        "finetune_learning_rate", 0.0, "Adam's rate in fine-tuning; 0 = optim.learning_rate.", **kw
    )


def quick(config):
    config.data.train_size, config.data.test_size = 1024, 256


def run(config, seeds, workdir, quick, command, flags):
    pretrain.run_experiment(
        config,
        seeds,
        workdir,
        fractions=report.numbers(
            "label_fractions",
            report.quick_or_given(flags, "label_fractions", flags.label_fractions[:2], quick),
            float,
            "0.01,0.1,1",
        ),
        pretrain_epochs=report.quick_or_given(flags, "pretrain_epochs", 1, quick),
        finetune_epochs=report.quick_or_given(flags, "finetune_epochs", 1, quick),
        val_size=report.quick_or_given(flags, "val_size", 128, quick),
        finetune_learning_rate=flags.finetune_learning_rate,
        command=command,
    )


def main(argv=None) -> int:
    """The script (``argv`` None), or its run in this process with ``argv``: the exit code."""
    return report.cli("pretrain_finetune", run, quick=quick, define=define, doc=__doc__, argv=argv)


if __name__ == "__main__":
    main()
