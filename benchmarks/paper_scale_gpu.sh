#!/usr/bin/env bash
# The paper-scale rehearsal (benchmarks/paper_scale.py) on one GPU: same world, tables, stages and scst breakdown,
# with the CLIP preparation, every stage and the standalone parts on CUDA (peak memory adds torch's peak allocated
# memory), more images and steps than the CPU run. Meant to take under 10 minutes on an A100/H100-class GPU.
# NOT RUN YET: written on a CPU-only machine; the first person with a GPU, please run it and report the figures.
#
#   bash benchmarks/paper_scale_gpu.sh [WORKDIR]          # default /tmp/paper_scale_gpu, kept afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use the CPU rehearsal')"
WORKDIR="${1:-/tmp/paper_scale_gpu}"
python benchmarks/paper_scale.py --device cuda --threads 0 --workdir "$WORKDIR" --keep \
    --images 600 --sentences 2000 --init-steps 20 --scst-steps 20 --supervised-steps 10
