#!/usr/bin/env bash
# The CUDA training path end to end: the CI-sized easyvqa-tiny recipe trained on the GPU in fp32 (whole recipe) and in
# fp16 with loss scaling (200 steps a stage, then the second stage resumed
# from its step-200 checkpoint to 300), each saved model scored on easy-VQA.
#
#     bash benchmarks/cuda_smoke.sh OUT_DIR        # needs a CUDA GPU, mmhub installed, easy-VQA in $MMHUB_HOME
#
# Writes OUT_DIR/cuda_smoke.log (commands, times, scores) and each run's metrics.jsonl; exits non-zero on the first
# failure. The CPU-trained shipped model scores 93.35% strict on the first 2,000 test questions (docs/benchmarks.md).
set -euo pipefail
out=${1:?usage: cuda_smoke.sh OUT_DIR}
mkdir -p "$out"
work=$(mktemp -d)
log="$out/cuda_smoke.log"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print('gpu', torch.cuda.get_device_name(0), 'torch', torch.__version__)" | tee "$log"
step() {  # step NAME COMMAND...: run, time and log one command
    local name=$1; shift
    local t0; t0=$(date +%s.%N)
    echo "== $name: $*" | tee -a "$log"
    "$@" 2>&1 | tail -n 25 | tee -a "$log"
    echo "== $name took $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s" | tee -a "$log"
}
recipe=$(python3 -c "import mmhub.recipes, pathlib; print(pathlib.Path(mmhub.recipes.__file__).parent / 'easyvqa-tiny.yaml')")
sed 's/^    lr: /    precision: fp16\n    lr: /' "$recipe" > "$work/easyvqa-tiny-fp16.yaml"
grep -c "precision: fp16" "$work/easyvqa-tiny-fp16.yaml" | grep -qx 2

step train-fp32 mmhub train "$recipe" --out "$work/fp32" --no-progress
step eval-fp32 mmhub eval "$work/fp32/instruct/model" --task easy-vqa --limit 2000 --batch-size 100
step train-fp16 mmhub train "$work/easyvqa-tiny-fp16.yaml" --out "$work/fp16" --max-steps 200 --no-progress
rm -r "$work/fp16/instruct/model"   # as if stopped after its last checkpoint: the resume restores optimiser, scaler, RNG
step resume-fp16 mmhub train --resume "$work/fp16" --max-steps 300 --no-progress
step eval-fp16 mmhub eval "$work/fp16/instruct/model" --task easy-vqa --limit 1000 --batch-size 100
for run in fp32 fp16; do
    find "$work/$run" -name metrics.jsonl | while read -r m; do
        cp "$m" "$out/${run}-$(basename "$(dirname "$m")")-metrics.jsonl"
    done
done
