#!/usr/bin/env bash
# Every GPU figure of GeoLink in one run (under 8 minutes on one H200): ViT-L pretraining samples/s and MFU (bf16,
# eager and compiled), ViT-L image-encoder inference (batch 256, bf16), fusion-encoder inference, tag embedding.
#
#   benchmarks/gpu_all.sh [OUT_DIR]          # writes OUT_DIR/gpu_all.json and OUT_DIR/gpu_all.md (default ./gpu_all_results)
#   benchmarks/gpu_all.sh OUT_DIR --smoke    # CPU, tiny config, seconds: checks that every section runs
#
# Extra arguments go to benchmarks/gpu_all.py (e.g. --skip compile, --peak-tflops 989).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_all_results}
shift || true
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
exec python benchmarks/gpu_all.py --out "$out" "$@"
