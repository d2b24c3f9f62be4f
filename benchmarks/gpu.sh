#!/usr/bin/env bash
# Every GPU measurement BENCHMARKS.md lacks, in one run (about 10 minutes on one modern GPU):
#   1. data-parallel training speed and peak memory per GPU: 1 process vs one per visible GPU
#      (benchmarks/ddp.py; needs >= 2 GPUs for the ratio), CIFAR-10 ResNet-18 PGD-AT+RPAT when a copy is
#      given, else digits;
#   2. rpat's training-step, evaluation and AutoAttack-wrapper numbers (rpat bench --quick).
#
#   bash benchmarks/gpu.sh [CIFAR10_DIR]     # CIFAR10_DIR: torchvision's files or train/<class>/ + test/<class>/
#
# Prints JSON lines; paste them into BENCHMARKS.md with the GPU model (nvidia-smi -L is printed first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
nvidia-smi -L || { echo "benchmarks/gpu.sh: no GPU visible (nvidia-smi failed)" >&2; exit 1; }
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
PROCS="1"
[ "$GPUS" -ge 2 ] && PROCS="1 $GPUS"
if [ $# -ge 1 ]; then
  PATHS=$(mktemp --suffix=.yaml)
  printf 'data: {paths: {cifar10: "%s"}, batch_size: 128, val_size: 1000}\nresources: {default: {gpu: 1}}\n' "$1" > "$PATHS"
  # 40 steps of 128 per epoch: enough for a rate, short enough for the whole script
  "$PY" benchmarks/ddp.py --processes $PROCS --config benchmarks/cifar10_paper.yaml "$PATHS" \
      --cell cifar10/resnet18/linf/pgd_at+rpat/seed0 --epochs 1 --train-subset 5120 --threads-per-process 4
else
  "$PY" benchmarks/ddp.py --processes $PROCS --threads-per-process 4
fi
"$PY" -m rpat bench --quick
