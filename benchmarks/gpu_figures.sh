#!/usr/bin/env bash
# The GPU figures issue 22 asks for, in one short run on a GPU machine (about 5-8 minutes):
#   1. MFU and peak memory of the DINOv2 step, bf16, batch 64, 2x224 + 8x96 crops, 65,536
#      prototypes: ViT-B/16, and ViT-L/16 with activation checkpointing (benchmarks/gpu_utilisation.py);
#   2. the GPU tests (SSL_VIT_GPU_TESTS=1 pytest -m gpu): bf16 training on CUDA, the entry point
#      there, and no device synchronisation between logging steps (tests/methods/test_host_sync.py);
#   3. packed vs unpacked crops on the GPU (benchmarks/packing.py, ViT-S/16 bf16): whether
#      model.pack_crops should be on by default there;
#   4. model.compile on the GPU (benchmarks/train_step.py, the DINOv2 step of ViT-S/16, bf16,
#      batch 64, eager then compiled block by block; the compilation falls in the warm-up steps).
#      Last, so that a run cut short still brings back 1-3.
# Results go to $OUT (the device tool's output folder) or ./gpu_figures.
#
# On this project's lent machines (the `device` tool) the image has torch, lightning, timm and
# pytest but not hydra-core, omegaconf and antlr4; carry them as wheels. Once, here, in the repo
# root (the folder is git-ignored through .git/info/exclude):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform any -d .whl hydra-core==1.3.2 omegaconf==2.3.0
#   .venv/bin/python -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
# then: run(command="bash benchmarks/gpu_figures.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
results="${OUT:-gpu_figures}"
mkdir -p "$results"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$results/gpu.txt"
"${PYTHON:-python3}" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" \
    | tee -a "$results/gpu.txt"
# GPU_SETTINGS / GPU_BATCH / PYTHON: a quick check elsewhere, e.g. on the CPU:
#   PYTHON=.venv/bin/python GPU_SETTINGS=tiny GPU_BATCH=8 PACKING_SETTINGS=tiny \
#       COMPILE_OVERRIDES="model.depth=1 data.batch_size=4 method.crops.global_size=48 method.crops.local_size=16" \
#       bash benchmarks/gpu_figures.sh
timeout 330 "${PYTHON:-python3}" benchmarks/gpu_utilisation.py --settings "${GPU_SETTINGS:-vit_base,vit_large_checkpointed}" \
    --batch "${GPU_BATCH:-64}" --json "$results/utilisation.json" 2>&1 | tee "$results/utilisation.txt"
SSL_VIT_GPU_TESTS=1 timeout 150 "${PYTHON:-python3}" -m pytest -q -m gpu -p no:cacheprovider \
    tests/methods/test_accelerator.py tests/methods/test_host_sync.py 2>&1 | tail -30 \
    | tee "$results/gpu_tests.txt"
timeout 120 "${PYTHON:-python3}" benchmarks/packing.py --steps 5 --settings "${PACKING_SETTINGS:-vit_small}" \
    --precisions bf16 2>&1 | tail -12 | tee "$results/packing.txt"
for compiled in false true; do
    timeout 150 "${PYTHON:-python3}" benchmarks/train_step.py method=dinov2 model=vit_small data=synthetic \
        method.crops.global_size=224 method.crops.local_size=96 method.crops.n_local=8 method.head.out_dim=65536 \
        data.batch_size=64 ${COMPILE_OVERRIDES:-} model.compile=$compiled 2>&1 | tail -4
done | tee "$results/compile.txt"
