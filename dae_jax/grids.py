"""Named sweep grids: ``dae-jax sweep --grid=NAME``. A grid is data, the same as a JSON
grid file (``--grid=FILE``):

- ``axes``: config key -> values, combined as a product; or ``union``: a list of such
  products (e.g. each noise kind with its own levels);
- ``config``: base config values the grid sets (``--config.KEY`` may not change them);
- ``score``: which scoring stages run (``bm3d``, ``probe``, ``matrix``; default all);
- ``plot``: the figures' axes, ``x:KEY,hue:KEY``; ``doc``: one line for ``--help``.
"""

GRIDS: dict[str, dict] = {
    "noise_sweep": {
        "doc": "How does the noise level change what a DAE learns? (level 0: a plain autoencoder)",
        "axes": {"noise.level": [0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]},
    },
    "corruption_types": {
        "doc": "Gaussian vs masking vs salt-and-pepper corruption, each over its levels.",
        "axes": {
            "noise.kind": ["gaussian", "masking", "salt_and_pepper"],
            "noise.level": [0.1, 0.25, 0.5],
        },
    },
    "loss_comparison": {
        "doc": "MSE vs binary cross-entropy across Gaussian noise levels.",
        "config": {"noise.kind": "gaussian"},
        "axes": {"loss": ["mse", "bce"], "noise.level": [0.0, 0.1, 0.3, 0.5, 1.0]},
    },
    "tied_weights": {
        "doc": "Tied vs untied decoder weights under Gaussian and masking noise.",
        "axes": {"model.tied_weights": [False, True], "noise.kind": ["gaussian", "masking"]},
        "config": {"noise.level": 0.25},
    },
    "optimizer": {
        "doc": "Learning rate x weight decay (AdamW), one compiled program.",
        "axes": {"optim.learning_rate": [1e-3, 3e-3], "optim.weight_decay": [0.0, 1e-4]},
        "score": {"bm3d": False, "matrix": False},
    },
}
