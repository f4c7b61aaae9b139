#!/usr/bin/env bash
# The whole pipeline: collect -> encode -> train (baseline, la, vq) -> decode -> plan -> eval, then the table.
#   bash reproduce.sh quick [OUT]   tiny, CPU, minutes (default OUT runs/quick); shows that every stage works
#   bash reproduce.sh full  [OUT]   the seed paper's table on one GPU (default OUT runs/full)
# Each finished stage leaves OUT/.done/<stage>; a re-run skips it, so an interrupted run picks up where it stopped.
# Environment: DATA=DIR trains on an existing dataset (e.g. `python data.py import-dinowm` output) instead of
# collecting one; DINO_WEIGHTS=PATH|random overrides the encoder choice below.
set -euo pipefail
cd "$(dirname "$0")"
mode=${1:-}
case "$mode" in
  quick|full) OUT=${2:-runs/$mode} ;;
  *) echo "usage: bash reproduce.sh quick|full [OUT]" >&2; exit 2 ;;
esac
mkdir -p "$OUT/.done" "$OUT/results"
PY=${PYTHON:-python3}

# DINOv2 weights: the official file when it is in the torch hub cache (or given), else random for `quick`.
hub=$($PY -c "import torch; print(torch.hub.get_dir())")/checkpoints/dinov2_vits14_pretrain.pth
if [ -n "${DINO_WEIGHTS:-}" ]; then W=$DINO_WEIGHTS
elif [ -f "$hub" ]; then W=$hub
elif [ "$mode" = quick ]; then W=random
else W=""  # full: dino.py downloads the official file (or explains how to get it offline)
fi
if [ "$W" = random ]; then
  echo "################################################################################################"
  echo "# No DINOv2 weights at $hub:"
  echo "# running with a RANDOM-INITIALISED encoder. The numbers below only show that the pipeline works."
  echo "# Get the weights as README.md says (Getting DINOv2 weights) for meaningful results."
  echo "################################################################################################"
fi

timings=()
stage() {  # stage NAME COMMAND...: run once, time it, mark it done
  local name=$1; shift
  if [ -f "$OUT/.done/$name" ]; then echo "== $name: done before, skipped"; return; fi
  echo "== $name: $*"
  local t0=$SECONDS
  "$@"
  touch "$OUT/.done/$name"
  timings+=("$name $((SECONDS - t0))")
}

if [ "$mode" = quick ]; then
  # 64-px frames -> 56-px encoder input (16 patches), a small predictor and IDM, short training and planning.
  COLLECT=(--episodes 40 --steps 80 --img-size 64 --workers 2)
  SIZE=56
  TRAIN=(--steps 300 --batch-size 32 --eval-every 100 --log-every 50 --val-batches 4 --stats-batches 8
         --depth 2 --heads 4 --dim-head 32 --mlp-dim 256 --idm-depth 1 --idm-heads 4 --idm-dim 128
         --idm-mlp-dim 256 --num-workers 0)
  DECODE=(--pairs 2000 --val-pairs 400 --max-epochs 40)
  PLAN=(--episodes 8 --num-samples 64 --topk 8 --opt-steps 5 --videos 1)
  OPEN=() MPC=()
  EVAL=(--windows 64 --probe-windows 256)
else
  # The seed's recipe: 162k steps at batch 64, 196-px encoder input, default model sizes.
  COLLECT=(--episodes 10000 --steps 100 --img-size 224 --workers "$(nproc)")
  SIZE=196
  TRAIN=(--steps 162000)
  DECODE=(--pairs 100000 --val-pairs 10000)
  PLAN=(--batch-episodes 10)
  OPEN=(--opt-steps 10) MPC=(--opt-steps 30)  # the seed's open loop ran 10 CEM iterations, stable-worldmodel 30
  EVAL=()
fi

DATA=${DATA:-$OUT/data}
[ -f "$DATA/meta.json" ] || stage collect $PY data.py collect --out "$DATA" "${COLLECT[@]}"
$PY data.py info "$DATA"
stage encode $PY dino.py encode --data "$DATA" --size "$SIZE" --dino-weights "$W"
for v in baseline la vq; do
  stage "train-$v" $PY train.py --data "$DATA" --variant "$v" --out "$OUT/$v" --dino-size "$SIZE" \
    --dino-weights "$W" "${TRAIN[@]}"
done
for v in la vq; do stage "decode-$v" $PY decode.py --run "$OUT/$v" "${DECODE[@]}"; done
for v in baseline la vq; do
  stage "plan-$v-open-loop" $PY plan.py --run "$OUT/$v" --protocol open-loop \
    --out "$OUT/results/$v-open-loop.json" "${PLAN[@]}" "${OPEN[@]}"
  stage "plan-$v-mpc" $PY plan.py --run "$OUT/$v" --protocol mpc --out "$OUT/results/$v-mpc.json" "${PLAN[@]}" "${MPC[@]}"
done
rm -f "$OUT/.done/eval"  # the table is cheap to rebuild and should reflect every result present
stage eval $PY eval.py --run "$OUT/baseline" --run "$OUT/la" --run "$OUT/vq" --out "$OUT/metrics.json" \
  --results "$OUT"/results/*.json "${EVAL[@]}"

echo
echo "wall-clock per stage (this invocation):"
for t in "${timings[@]}"; do printf '  %-22s %6s s\n' ${t}; done
echo "encoder weights: ${W:-official file}; outputs in $OUT (videos next to results/*.json)"
