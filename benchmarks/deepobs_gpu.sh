#!/usr/bin/env bash
# The DeepOBS protocol's 4,320 training runs (studies/deepobs_protocol.yaml: 12 optimizers x 36 lrs x 10 seeds on
# the MNIST-1D MLP, 50 epochs) as twelve `train.py` populations of 360 members on one device, without tracking: the
# training part of the study on a GPU, against a one-at-a-time sample on the same device.
#   benchmarks/deepobs_gpu.sh [EPOCHS] [OPTIMIZER ...]     # defaults: 50, the study's twelve
# PYTHONPATH=src where optstudy is not installed. Without CUDA it runs on the CPU (try: 1 sgd adam).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EPOCHS=${1:-50}
shift || true
read -r TRAINER LRS SEEDS NAMES < <($PY - "$@" <<'PY'
import sys, torch, yaml
spec = yaml.safe_load(open("studies/deepobs_protocol.yaml"))
names = sys.argv[1:] or list(spec["optimizers"])
lrs = ",".join(str(x) for x in spec["optimizers"][names[0]]["lr"])
seeds = ",".join(str(s) for s in spec["seeds"])
print("trainer=gpu" if torch.cuda.is_available() else "trainer=cpu", lrs, seeds, ",".join(names))
PY
)
COMMON=(experiment=mnist1d_mlp logger=none checkpoint.enabled=false trainer.max_epochs="$EPOCHS" "$TRAINER")
LOG=$(mktemp)
echo "$TRAINER, $EPOCHS epochs, lrs [$LRS], seeds [$SEEDS]"
start=$(date +%s.%N)
for name in ${NAMES//,/ }; do
    t0=$(date +%s.%N)
    $PY train.py "${COMMON[@]}" optimizer="$name" "population.lr=[$LRS]" "population.seed=[$SEEDS]" >"$LOG" 2>&1 \
        || [ $? -eq 3 ] || { tail -5 "$LOG"; exit 1; }  # 3: every member diverged
    printf '%-9s %6.1f s  %s\n' "$name" "$(echo "$(date +%s.%N) - $t0" | bc)" "$(grep '^epoch' "$LOG" | tail -1)"
done
total=$(echo "$(date +%s.%N) - $start" | bc)
runs=$(( $(echo "$LRS" | tr ',' '\n' | wc -l) * $(echo "$SEEDS" | tr ',' '\n' | wc -l) * $(echo "${NAMES//,/ }" | wc -w) ))
echo "populations: $runs runs in $total s"
t0=$(date +%s.%N)
for lr in 1e-3 1e-1; do  # one at a time: two runs of the grid's middle, seed 0
    $PY train.py "${COMMON[@]}" optimizer=adam optimizer.lr=$lr seed=0 >"$LOG" 2>&1 || { tail -5 "$LOG"; exit 1; }
done
one=$(echo "($(date +%s.%N) - $t0) / 2" | bc -l)
printf 'one at a time: %.1f s a run -> %.0f s for %d runs; populations %.1fx faster\n' "$one" \
    "$(echo "$one * $runs" | bc -l)" "$runs" "$(echo "$one * $runs / $total" | bc -l)"
rm -f "$LOG"
