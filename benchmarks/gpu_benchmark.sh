#!/usr/bin/env bash
# Every GPU measurement of issue 9 (and issue 7's robust_resnet18 timing) in one call, for a lent
# GPU machine with little time: each step has its own time limit and its figures land in $OUT.
#
#   OUT=outputs/benchmarks/gpu PNEUMONIA_DATA=/path/to/chest_xray bash benchmarks/gpu_benchmark.sh
#
# Steps: 1 Lightning against a plain loop; 2 each lever's share; 3 the study preset end to end
# (start-up timed apart); 4 Guided Grad-CAM images/s; 5 robust_resnet18 end to end; 6 trials per
# GPU, one after another against 4 at once; 7 the CUDA-only tests. STEPS="1 3" runs a subset.
# The limits add up to 21 minutes: a 10-minute call fits steps 1, 3, 4, 5 and 7.
#
# Each step's whole output goes to $OUT/step<N>.log (unbuffered, so a step cut by its limit keeps
# what it printed); run folders go to $RUNS, and only their test_metrics.json come back in $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/benchmarks/gpu}
RUNS=${RUNS:-/tmp/pneumonia_gpu_runs}
STEPS=${STEPS:-1 2 3 4 5 6 7}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$RUNS"
wants() { [[ " $STEPS " == *" $1 "* ]]; }
step() { echo; echo "== $* ($(date +%T))"; }
# train.py end to end under a time limit: timed_run <label> <seconds> <run folder> <overrides...>
timed_run() {
  local label=$1 limit=$2 run=$3 start=$SECONDS
  shift 3
  timeout "$limit" python train.py trainer=gpu run_dir="$RUNS/$run" "$@" >"$OUT/$run.log" 2>&1
  local rc=$?
  echo "$label end to end: $((SECONDS - start)) s (exit $rc)"
  grep -E "balanced_accuracy|auroc|Error" "$OUT/$run.log" | tail -4
  cp "$RUNS/$run/test_metrics.json" "$OUT/$run.test_metrics.json" 2>/dev/null
}
if ! python -c "import hydra, omegaconf, captum, lightning, pneumonia" 2>"$OUT/imports.log"; then
  echo "imports failed ($OUT/imports.log): put src/ and the pure-Python packages (hydra, omegaconf,"
  echo "antlr4, captum, joblib, hydra_plugins) on PYTHONPATH, e.g. PYTHONPATH=\$PWD/src:\$PWD/.devsite"
  cat "$OUT/imports.log"
  exit 1
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"

if wants 1; then
  step "1. LightningModule against a plain loop, same device-held batches, bf16"
  timeout 150 python benchmarks/study_benchmark.py --trainer gpu --skip-cache --skip-training \
    --batches 200 --repeats 3 --out "$RUNS/throughput" 2>&1 | tee "$OUT/step1.log" | grep -v Warning | tail -8
  cp "$RUNS"/throughput/*.json "$OUT/" 2>/dev/null
fi
if wants 2; then
  step "2. the levers: device batches, progress-bar refresh, bf16"
  timeout 150 python benchmarks/speed_levers.py --device cuda --batches 300 --repeats 2 \
    --out "$OUT" 2>&1 | tee "$OUT/step2.log" | tail -6
fi
if wants 3; then
  step "3. the study preset end to end (python start-up and imports timed apart)"
  start=$SECONDS
  python -c "import pneumonia.training.run, lightning, torch"
  echo "imports: $((SECONDS - start)) s"
  timed_run "study preset" 150 study experiment=study_unweighted
fi
if wants 4; then
  step "4. Guided Grad-CAM images/s at 128 px"
  timeout 90 python benchmarks/explain_benchmark.py --device cuda --images 2048 \
    --batch-sizes 64,256,1024 --out "$OUT" 2>&1 | tee "$OUT/step4.log" | tail -8
fi
if wants 5; then
  step "5. experiment=robust_resnet18 end to end (issue 7: <= 2 min)"
  timed_run robust_resnet18 240 robust_resnet18 experiment=robust_resnet18
fi
if wants 6; then
  step "6. trials per GPU: 6 study-grid trials one after another, then 4 at once"
  timeout 300 python benchmarks/trials_per_device.py --trainer gpu --jobs 4 --epochs 5 \
    --out "$RUNS/trials" 2>&1 | tee "$OUT/step6.log" | tail -4
  cp "$RUNS"/trials/*.json "$OUT/" 2>/dev/null
fi
if wants 7; then
  step "7. the CUDA-only tests"
  timeout 180 python -m pytest -q -p no:cacheprovider tests/integration/test_gpu.py \
    tests/model/test_dropout.py tests/data/test_device_batches.py tests/model/test_augmentation.py \
    tests/model/test_normalization.py tests/metrics/test_diagnostic.py \
    tests/training/test_random_stream.py -k "cuda or gpu" 2>&1 | tee "$OUT/step7.log" | tail -15
fi
