#!/usr/bin/env bash
# Creates runs/torch-venv with a CPU-usable PyTorch for experiments/baselines/torch_conv.py.
# Its own venv, never the project's: nothing here is part of `make test` or CI.
#
#     bash experiments/baselines/setup_torch.sh
#
# PyPI has no CPU-only torch for Linux: its torch wheel is a CUDA build that depends on
# the nvidia-* wheels (~3 GB more). `pip install --no-deps torch` is not enough: `import
# torch` then fails with "libcudnn.so.9: cannot open shared object file". So:
# 1. a CPU build (version `+cpu`, ~200 MB, PyTorch's own index) where pip finds one
#    without the network: this machine's pip has one in its find-links (/opt/wheels,
#    torch 2.13.0+cpu);
# 2. else PyPI's torch with all its dependencies (downloads the CUDA libraries, which
#    stay unused on CPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=runs/torch-venv
python3 -m venv "$venv"
pip=("$venv/bin/pip" install --quiet)
cpu_build=$("$venv/bin/pip" index versions torch 2>/dev/null | tr ' ,' '\n\n' | grep -m1 '+cpu$' || true)
if [ -n "$cpu_build" ]; then
  echo "installing the CPU build torch==$cpu_build"
  "${pip[@]}" --no-deps "torch==$cpu_build"
  "${pip[@]}" filelock typing-extensions sympy networkx jinja2 fsspec numpy
else
  echo "no CPU build found: installing PyPI's torch with its CUDA dependencies"
  "${pip[@]}" torch numpy
fi
"$venv/bin/python" -c "import torch; print('torch', torch.__version__, '| CUDA available:', torch.cuda.is_available(), '| threads:', torch.get_num_threads())"
