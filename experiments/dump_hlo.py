"""Dumps the optimised HLO of the training chunk, to compare two versions of the code.

    python experiments/dump_hlo.py OUT_DIR
    PYTHONPATH=/path/to/other/checkout python /path/to/other/checkout/experiments/dump_hlo.py OTHER
    diff -r OUT_DIR OTHER

For the seed MLP at K = 1 and K = 8 and the conv DAE at K = 1 and K = 2 (batch 128, a
4-step chunk on 28x28x1 images), writes each program's instructions (``NAME.hlo``), with
metadata and stack-frame ids stripped, so that two checkouts compiling the same program
give the same files. Timing on a shared machine is noisy; the same program is not.
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from dae_jax import step
from dae_jax.configs import default, seed

_INSTRUCTION = re.compile(r"^\s*(ROOT )?%?[\w.\-]+ = |^(ENTRY|%[\w.\-]+ )")


def config(kind: str):
    if kind == "mlp":
        return seed.get_config()
    out = default.get_config()
    out.model.kind = "conv"
    return out


def instructions(kind: str, models: int) -> str:
    cfg = config(kind)
    graphdef, _ = step.abstract_state(cfg)
    setup = step.Setup.from_config(cfg, graphdef)
    keys = jax.random.split(jax.random.key(0), models)
    states = jax.vmap(lambda key: step.init_state(cfg, key)[1])(keys)
    hyper = step.hyper_of([step.Member.of(cfg).mapping] * models)
    args = (
        states,
        jnp.ones((models,), bool),
        jnp.zeros((1024, 28, 28, 1), jnp.uint8),
        jnp.zeros((models, 8, 128), jnp.int32),
        jnp.int32(0),
        keys,
        hyper,
    )
    chunk = jax.jit(functools.partial(step.population_chunk, setup, 4))
    text = re.sub(r"metadata=\{[^}]*\}", "", chunk.lower(*args).compile().as_text() or "")
    lines = [line for line in text.splitlines() if _INSTRUCTION.match(line)]
    return "\n".join(re.sub(r",? ?stack_frame_id=\d+", "", line) for line in lines) + "\n"


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python experiments/dump_hlo.py OUT_DIR")
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for kind, models in (("mlp", 1), ("mlp", 8), ("conv", 1), ("conv", 2)):
        text = instructions(kind, models)
        (out / f"{kind}{models}.hlo").write_text(text)
        print(
            f"{kind} K={models}: {len(text.splitlines())} instructions -> {out}/{kind}{models}.hlo"
        )


if __name__ == "__main__":
    main(sys.argv)
