#!/usr/bin/env bash
# The whole pipeline: collect -> train (baseline, la, vq) -> decode -> plan (+ policies) -> eval, then the tables.
#   bash reproduce.sh quick [OUT]   CPU, <= 10 min on 2 cores (default OUT runs/quick): state tokens end to end, then a
#                                   short pixel-path smoke (random DINOv2) under OUT/pixels/
#   bash reproduce.sh state [OUT]   CPU, about an hour on 2 cores: the README's state-token table (100 open-loop tasks)
#   bash reproduce.sh full  [OUT]   the seed paper's table with DINOv2 tokens on one GPU (default OUT runs/full)
# Each finished stage leaves OUT/.done/<stage>; a re-run skips it, so an interrupted run picks up where it stopped.
# Environment: DATA=DIR uses an existing dataset (e.g. `python data.py import-dinowm` output) instead of collecting;
# DINO_WEIGHTS=PATH|random overrides the encoder of the pixel runs.
set -euo pipefail
cd "$(dirname "$0")"
mode=${1:-}
case "$mode" in
  quick|state|full) OUT=${2:-runs/$mode} ;;
  *) echo "usage: bash reproduce.sh quick|state|full [OUT]" >&2; exit 2 ;;
esac
if [ -n "${DATA:-}" ] && [ ! -f "$DATA/meta.json" ]; then
  echo "error: DATA=$DATA is not a dataset folder (no meta.json); fix the path or unset DATA to collect one" >&2; exit 2
fi
PY=${PYTHON:-python3}
mkdir -p "$OUT/.done" "$OUT/results" "$OUT/logs"
: > "$OUT/.timings"

stage() {  # stage NAME COMMAND...: run once (skipped when OUT/.done/NAME exists), time it, mark it done
  local name=$1; shift
  if [ -f "$OUT/.done/$name" ]; then echo "== $name: done before, skipped"; return; fi
  echo "== $name: $*"
  local t0=$SECONDS
  "$@"
  touch "$OUT/.done/$name"
  echo "$name $((SECONDS - t0))" >> "$OUT/.timings"
}
pids=()
background() {  # background NAME COMMAND...: a stage on one core, its output in OUT/logs/NAME.log
  local name=$1
  echo "== $name: started in the background (log: $OUT/logs/$name.log)"
  (OMP_NUM_THREADS=1 stage "$@" > "$OUT/logs/$name.log" 2>&1; tail -n 2 "$OUT/logs/$name.log") & pids+=($!)
}
join() { for p in "${pids[@]}"; do wait "$p"; done; pids=(); }  # a failed stage fails the script here

# State tokens: one 12-number token per frame from the simulator state (wm.state_tokens), a small predictor and IDM.
STATE_MODEL=(--tokens state --depth 4 --heads 4 --dim-head 32 --mlp-dim 512 --dropout 0 --idm-depth 2 --idm-heads 4
             --idm-dim 64 --idm-mlp-dim 128 --batch-size 256 --lr-predictor 1e-3 --lr-action 1e-3 --lr-idm 1e-3
             --val-batches 8 --stats-batches 20 --log-every 500)
pipeline() {  # pipeline DIR DATA STEPS EPISODES_OPEN EPISODES_MPC CEILING_OPEN CEILING_MPC PAIRS [TRAIN FLAGS...]
  local dir=$1 data=$2 steps=$3 n_open=$4 n_mpc=$5 c_open=$6 c_mpc=$7 pairs=$8; shift 8
  for v in baseline la; do background "train-$v" $PY train.py --data "$data" --variant "$v" --out "$dir/$v" --steps "$steps" "$@"; done
  join
  background train-vq $PY train.py --data "$data" --variant vq --out "$dir/vq" --steps "$steps" "$@"
  background decode-la $PY decode.py --run "$dir/la" --pairs "$pairs" --val-pairs $((pairs / 10))
  join
  stage decode-vq $PY decode.py --run "$dir/vq" --pairs "$pairs" --val-pairs $((pairs / 10))
  for v in baseline la vq; do
    stage "plan-$v-open-loop" $PY plan.py --run "$dir/$v" --protocol open-loop --episodes "$n_open" --opt-steps 10 \
      --ceiling-episodes "$c_open" --out "$dir/results/$v-open-loop.json"
    stage "plan-$v-mpc" $PY plan.py --run "$dir/$v" --protocol mpc --episodes "$n_mpc" --opt-steps 10 \
      --ceiling-episodes "$c_mpc" --out "$dir/results/$v-mpc.json"
  done
}

if [ "$mode" = quick ] || [ "$mode" = state ]; then
  DATA=${DATA:-$OUT/data}
  if [ "$mode" = quick ]; then S=(3000 50 50 10 6 20000); E=600; else S=(12000 100 50 20 10 100000); E=2000; fi
  [ -f "$DATA/meta.json" ] || stage collect $PY data.py collect --out "$DATA" --episodes $E --steps 100
  pipeline "$OUT" "$DATA" "${S[@]}" "${STATE_MODEL[@]}"
  rm -f "$OUT/.done/eval"  # the table is cheap to rebuild and should reflect every result present
  stage eval $PY eval.py --run "$OUT/baseline" "$OUT/la" "$OUT/vq" --results "$OUT"/results/*.json \
    --out "$OUT/metrics.json" --windows 600 --probe-windows 5000
fi

if [ "$mode" = full ]; then  # DINOv2 tokens with the seed's recipe (162k steps at batch 64, 100k decoder pairs)
  DATA=${DATA:-$OUT/data}
  W=${DINO_WEIGHTS:-}
  [ -f "$DATA/meta.json" ] || stage collect $PY data.py collect --out "$DATA" --episodes 10000 --steps 100
  stage encode $PY dino.py encode --data "$DATA" ${W:+--dino-weights "$W"}
  for v in baseline la vq; do
    stage "train-$v" $PY train.py --data "$DATA" --variant "$v" --out "$OUT/$v" --tokens dinov2 ${W:+--dino-weights "$W"}
  done
  for v in la vq; do stage "decode-$v" $PY decode.py --run "$OUT/$v"; done
  for v in baseline la vq; do  # the seed's open loop ran 10 CEM iterations, stable-worldmodel's mpc 30
    stage "plan-$v-open-loop" $PY plan.py --run "$OUT/$v" --protocol open-loop --opt-steps 10 --out "$OUT/results/$v-open-loop.json"
    stage "plan-$v-mpc" $PY plan.py --run "$OUT/$v" --protocol mpc --opt-steps 30 --out "$OUT/results/$v-mpc.json"
  done
  rm -f "$OUT/.done/eval"
  stage eval $PY eval.py --run "$OUT/baseline" "$OUT/la" "$OUT/vq" --results "$OUT"/results/*.json --out "$OUT/metrics.json"
fi

if [ "$mode" = quick ]; then  # the pixel path: DINOv2 (random weights unless given), tiny, to show that it runs
  P=$OUT/pixels
  mkdir -p "$P/.done"
  : > "$P/.timings"
  W=${DINO_WEIGHTS:-random}
  OUT=$P stage collect $PY data.py collect --out "$P/data" --episodes 24 --steps 60 --img-size 64
  OUT=$P stage encode $PY dino.py encode --data "$P/data" --size 56 --dino-weights "$W"
  for v in baseline vq; do
    OUT=$P stage "train-$v" $PY train.py --data "$P/data" --variant "$v" --out "$P/$v" --dino-size 56 --dino-weights "$W" \
      --steps 60 --batch-size 16 --eval-every 60 --log-every 20 --val-batches 2 --stats-batches 2 --depth 2 --heads 4 \
      --dim-head 32 --mlp-dim 256 --idm-depth 1 --idm-heads 4 --idm-dim 128 --idm-mlp-dim 256 --num-workers 0
  done
  OUT=$P stage decode-vq $PY decode.py --run "$P/vq" --pairs 400 --val-pairs 100 --max-epochs 5
  for v in baseline vq; do
    OUT=$P stage "plan-$v" $PY plan.py --run "$P/$v" --protocol open-loop --episodes 4 --num-samples 32 --topk 4 \
      --opt-steps 2 --ceiling-episodes 1 --videos 1 --out "$P/results/$v-open-loop.json"
  done
  rm -f "$P/.done/eval"
  OUT=$P stage eval $PY eval.py --run "$P/baseline" "$P/vq" --results "$P"/results/*.json --out "$P/metrics.json" \
    --windows 32 --probe-windows 64
fi

echo
echo "wall-clock per stage (this invocation; background stages ran two at a time, one core each):"
cat "$OUT/.timings" "${P:-/dev/null}/.timings" 2>/dev/null | while read -r name s; do printf '  %-24s %6s s\n' "$name" "$s"; done
if [ "$mode" = quick ]; then
  echo "State tokens ($OUT/metrics*.json, results/): the method, learned in minutes. Pixels ($OUT/pixels/): a smoke run"
  echo "of the DINOv2 path with ${W:-random} weights: its numbers say only that every stage runs."
fi
