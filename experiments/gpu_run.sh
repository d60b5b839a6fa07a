#!/usr/bin/env bash
# The GPU measurements behind experiments/results/*-h100* (or whatever GPU it finds), as
# one script for one short lease of a GPU machine that has JAX (CUDA) but no internet:
#
#   OUT=DIR BUDGET=540 bash experiments/gpu_run.sh           # first lease
#   OUT=DIR BUDGET=300 PART=2 bash experiments/gpu_run.sh    # the follow-up lease
#
# Pure-Python packages missing there travel as wheels in .whl/ (ml_collections,
# dm_pix); flax/optax/orbax wheels in .whl_fallback/ are used only if the installed
# ones cannot run dae_jax. Fashion-MNIST's IDX files travel in .gpudata/.
# Steps run in order of importance, each within what is left of BUDGET seconds:
# the benchmark; the benchmark with lax.scan unrolled 8x; one real `dae-jax train` of
# the default config; the conv DAE noise sweep; conv pre-training + fine-tuning.
# PART=2 (after the first run's results): a wider, deeper conv DAE at sigma 0.5 and 0.1,
# then conv pre-training + fine-tuning again (the first run stopped at a bug).
# PART=3 (the one-engine change): `benchmark.py --batch_sizes=128 --models=1,8` of the
# tree before that change (a copy of commit 433287e's dae_jax/ and benchmark.py in
# .oldtree/, when present) and of this tree, twice each, interleaved; then the 21-model
# noise sweep (7 sigma x 3 seeds, 10 epochs, BM3D and the probe included) end to end; the
# conv DAE's sweep at sigma 0.1 and 0.5 (BM3D on the same images); a default
# `dae-jax train` with TensorBoard on and 20 steps profiled.
# PART=4 (issue 20): `dae-jax bench` in full (K up to 256, float32 = TF32 beside bfloat16,
# time to 18.5 dB on .gpudata's Fashion-MNIST); its bench.json compares with the CPU's:
# `dae-jax bench --compare experiments/results/bench-cpu/bench.json DIR/bench.json`.
# Everything lands in $OUT/gpu_results.tgz (re-packed after each step) and $OUT/log.txt.
set -u
OUT=${OUT:-runs/gpu_out}
BUDGET=${BUDGET:-540}
RESULTS=/tmp/gpu_results
mkdir -p "$OUT" "$RESULTS"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
if ! $PY -c "from flax import nnx; nnx.List; import orbax.checkpoint, optax, dae_jax.train" 2>/dev/null; then
  echo "installed flax/orbax/optax cannot run dae_jax: using .whl_fallback"
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl_fallback/*.whl || exit 1
fi
nvidia-smi -L
$PY - <<'EOF'
import importlib.metadata as md
import jax
names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml_collections", "dm_pix",
         "numpy", "tensorboardX", "bm3d")
print({n: md.version(n) for n in names}, jax.devices())
EOF

step() {  # name, most seconds, command...
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "=== $name SKIPPED (budget spent)"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (at most $limit s)"
  local start=$SECONDS
  timeout "$limit" "$@" || echo "=== $name FAILED (exit $?)"
  echo "=== $name took $((SECONDS - start)) s"
  tar czf "$OUT/gpu_results.tgz" --exclude=checkpoints -C "$RESULTS" . 2>/dev/null
}

if [ "${PART:-1}" = 4 ]; then
  step "dae-jax bench" 500 $PY -m dae_jax bench --workdir="$RESULTS/bench" --data_dir=.gpudata
elif [ "${PART:-1}" = 3 ]; then
  for round in 1 2; do
    if [ -d .oldtree ]; then
      step "benchmark before the engine, round $round" 60 env PYTHONPATH=$PWD/.oldtree:$PYTHONPATH \
        $PY .oldtree/experiments/benchmark.py --steps=400 --repeats=5 --batch_sizes=128 \
        --models=1,8 --workdir="$RESULTS/bench_before_$round"
    fi
    step "benchmark after the engine, round $round" 60 $PY experiments/benchmark.py --steps=400 \
      --repeats=5 --batch_sizes=128 --models=1,8 --conv= --workdir="$RESULTS/bench_after_$round"
  done
  step "noise sweep, 21 models" 360 $PY experiments/noise_sweep.py \
    --workdir="$RESULTS/noise_sweep" --config.data.local_dir=.gpudata
  step "conv noise sweep at sigma 0.1 and 0.5 (BM3D beside it)" 150 $PY experiments/noise_sweep.py \
    --workdir="$RESULTS/conv_noise_sweep" --config.data.local_dir=.gpudata \
    --config.model.kind=conv --config.model.skip=True --levels=0.1,0.5
  step "dae-jax train, TensorBoard on, 20 steps profiled" 60 $PY -m dae_jax train \
    --workdir="$RESULTS/train_profile" --config.data.local_dir=.gpudata --config.profile_steps=20
  tar czf "$OUT/gpu_results.tgz" --exclude=checkpoints -C "$RESULTS" . 2>/dev/null
elif [ "${PART:-1}" = 1 ]; then
  step "benchmark" 150 $PY experiments/benchmark.py --steps=400 --repeats=5 \
    --workdir="$RESULTS/bench"
  step "benchmark, scan unroll 8" 50 $PY experiments/benchmark.py --steps=400 --repeats=5 \
    --unroll=8 --batch_sizes=128 --workdir="$RESULTS/bench_unroll8"
  step "dae-jax train (default config)" 60 $PY -m dae_jax train --workdir="$RESULTS/train_mlp" \
    --config.data.local_dir=.gpudata --config.compile_cache=/tmp/compile_cache
  rm -rf "$RESULTS/train_mlp/checkpoints"
  step "conv noise sweep" 220 $PY experiments/noise_sweep.py --workdir="$RESULTS/conv_noise_sweep" \
    --config.data.local_dir=.gpudata --config.model.kind=conv --config.model.skip=True \
    --config.compile_cache=/tmp/compile_cache
  step "conv pretrain_finetune" 200 $PY experiments/pretrain_finetune.py \
    --workdir="$RESULTS/conv_pretrain_finetune" --config.data.local_dir=.gpudata \
    --config.model.kind=conv --config.compile_cache=/tmp/compile_cache
else
  for level in 0.5 0.1; do
    step "dae-jax train, conv 64-128-128 x2 with skips, sigma $level" 60 $PY -m dae_jax train \
      --workdir="$RESULTS/train_conv_wide_$level" --config.data.local_dir=.gpudata \
      --config.model.kind=conv --config.model.skip=True --config.model.channels="(64,128,128)" \
      --config.model.convs_per_level=2 --config.noise.level=$level \
      --config.compile_cache=/tmp/compile_cache
    rm -rf "$RESULTS/train_conv_wide_$level/checkpoints"
  done
  step "conv pretrain_finetune" 240 $PY experiments/pretrain_finetune.py \
    --workdir="$RESULTS/conv_pretrain_finetune" --config.data.local_dir=.gpudata \
    --config.model.kind=conv --config.compile_cache=/tmp/compile_cache
fi
echo "=== all done in $SECONDS s"
