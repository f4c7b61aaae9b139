#!/usr/bin/env bash
# The whole pipeline: collect -> train (baseline, la, vq) -> decode -> plan (+ policies) -> eval, then the tables.
#   bash reproduce.sh quick [OUT]   CPU, <= 10 min on 2 cores (default OUT runs/quick): state tokens end to end, then a
#                                   short pixel-path smoke (random DINOv2) under OUT/pixels/
#   bash reproduce.sh state [OUT]   CPU, ~35 min on 2 cores: the README's state-token table (100 open-loop tasks)
#   bash reproduce.sh labels [OUT]  CPU, about an hour on 2 cores: success against labelled transitions (1k, 10k, 100k)
#                                   on the state table's 100 open-loop tasks, with a table and a PNG plot
#   bash reproduce.sh jepa  [OUT]   CPU, ~15 min on 2 cores: a pixel encoder trained from scratch (PLDM/LeWM-style,
#                                   SIGReg) with the labelled baseline, planned on 100 open-loop tasks
#   bash reproduce.sh jepa-labels [OUT]  CPU, about an hour on 2 cores: the label question on pixels: a jepa world
#                                   model trained without any label (la) + decoder / adapter against labels-only
#                                   jepa baselines, at 1k and 10k labels, with what the label-free encoder keeps
#   bash reproduce.sh full  [OUT]   the seed paper's table with DINOv2 tokens on one GPU (default OUT runs/full); it
#                                   prints its plan first and stops (exit 2) if disk, RAM or GPU memory cannot hold it
#   bash reproduce.sh full --dry-run [OUT]   only that plan: stages, sizes, feature mode, GPU memory and time (seconds)
#   bash reproduce.sh gpu-check [OUT]        <= 5 min on one GPU: every CUDA path once, throughput -> OUT/gpu-check.json
# Each finished stage leaves OUT/.done/<stage>; a re-run skips it, so an interrupted run picks up where it stopped.
# Environment: DATA=DIR uses an existing dataset (e.g. `python data.py import-dinowm` output) instead of collecting;
# DINO_WEIGHTS=PATH|random overrides the encoder of the pixel runs; FEATURES=auto|cache|memory|off (full): the DINOv2
# features from the float16 disk cache, from an int8 copy every training process encodes into GPU memory, or DINOv2
# on every batch (auto: the cache when the disk holds it, else memory when the GPU does, else off).
set -euo pipefail
cd "$(dirname "$0")"
mode=${1:-}
dry=0
if [ "$mode" = full ] && [ "${2:-}" = --dry-run ]; then dry=1; shift; fi
case "$mode" in
  quick|state|labels|jepa|jepa-labels|full|gpu-check) OUT=${2:-runs/$mode} ;;
  *) echo "usage: bash reproduce.sh quick|state|labels|jepa|jepa-labels|full|gpu-check [OUT]  (or: full --dry-run"           "[OUT])" >&2
     exit 2 ;;
esac
PY=${PYTHON:-python3}
if [ "$mode" = gpu-check ] && ! $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu-check: no CUDA device is visible on this machine; nothing to check"; exit 0
fi
if [ -n "${DATA:-}" ] && [ ! -f "$DATA/meta.json" ]; then
  echo "error: DATA=$DATA is not a dataset folder (no meta.json); fix the path or unset DATA to collect one" >&2; exit 2
fi
if [ "$mode" = full ]; then  # its environment settings, checked before anything is written
  case "${FEATURES:-auto}" in auto|cache|memory|off) ;; *)
    echo "error: FEATURES=$FEATURES: choose auto, cache, memory or off (or unset it)" >&2; exit 2 ;;
  esac
  [[ "${STEPS:-1}" =~ ^[1-9][0-9]*$ ]] ||
    { echo "error: STEPS=$STEPS: a whole number of training steps, e.g. 162000" >&2; exit 2; }
fi
mkdir -p "$OUT/.done" "$OUT/results" "$OUT/logs" 2> /dev/null ||
  { echo "error: cannot make folders under OUT=$OUT (a file, or not writable): choose another OUT" >&2; exit 2; }
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
same_data() {  # DIR: the runs in OUT belong to one dataset; refuse another one on a finished OUT (no stage is skipped
  local fp                                # against the wrong data)
  fp=$($PY -c 'import sys, data; print(data.load_meta(sys.argv[1], verify=True)["fingerprint"])' "$1" 2>/dev/null) ||
    { echo "error: $1 is not a readable dataset (python data.py info $1 says why)" >&2; exit 2; }
  if [ -f "$OUT/.done/dataset" ] && [ "$(cat "$OUT/.done/dataset")" != "$fp" ]; then
    echo "error: $OUT holds runs on the dataset $(cat "$OUT/.done/dataset"), but $1 is $fp: choose another OUT" >&2
    exit 2
  fi
  echo "$fp" > "$OUT/.done/dataset"
}
pids=()
background() {  # background NAME COMMAND...: a stage on one core, its output in OUT/logs/NAME.log
  local name=$1
  echo "== $name: started in the background (log: $OUT/logs/$name.log)"
  (OMP_NUM_THREADS=1 stage "$@" > "$OUT/logs/$name.log" 2>&1; tail -n 2 "$OUT/logs/$name.log") & pids+=($!)
}
join() { for p in "${pids[@]}"; do wait "$p"; done; pids=(); }  # a failed stage fails the script here

# State tokens: one 12-number token per frame from the simulator state (wm.state_tokens), a small predictor and IDM.
# 5 adapters averaged (the planner finds fewer errors to exploit), fitted on every train window: the unlabelled ones
# pseudo-labelled by an inverse model fitted on the same labelled pairs (decode.py --unlabelled)
ADAPTER=(--head adapter --ensemble 5 --unlabelled -1)
STATE_MODEL=(--tokens state --depth 4 --heads 4 --dim-head 32 --mlp-dim 512 --dropout 0 --idm-depth 2 --idm-heads 4
             --idm-dim 64 --idm-mlp-dim 128 --batch-size 256 --lr-predictor 1e-3 --lr-action 1e-3 --lr-idm 1e-3
             --schedule cosine --val-batches 8 --stats-batches 20 --log-every 500 --eval-every 2000)
state_pipeline() {  # DIR DATA: two lanes of stages at a time, one core each; sizes from the arrays below
  local dir=$1 data=$2 v
  open=(--protocol open-loop --episodes ${N[0]} --ceiling-episodes ${N[1]} --opt-steps 10)
  mpc=(--protocol mpc --episodes ${N[2]} --ceiling-episodes ${N[3]} --opt-steps 10)
  background train-baseline $PY train.py --data "$data" --variant baseline --out "$dir/baseline" --steps ${STEPS[0]} \
    "${STATE_MODEL[@]}"
  background train-la $PY train.py --data "$data" --variant la --out "$dir/la" --steps ${STEPS[1]} "${STATE_MODEL[@]}"
  join
  plans baseline "$dir"  # both cores: computes the ceilings (simulator as the planner's model), cached for the rest
  background lane-vq lane_vq "$dir" "$data"
  background lane-la-policies lane_la_policies "$dir" "$data"
  join
  rm -f "$OUT/.done/eval"  # the table is cheap to rebuild and should reflect every result present
  stage eval $PY eval.py --run "$dir/baseline" "$dir/la" "$dir/vq" --results "$dir"/results/*.json \
    --out "$dir/metrics.json" --windows 600 --probe-windows 5000
}
plans() {  # VARIANT DIR: plan.py under both protocols
  stage "plan-$1-open-loop" $PY plan.py --run "$2/$1" "${open[@]}" --out "$2/results/$1-open-loop.json"
  stage "plan-$1-mpc" $PY plan.py --run "$2/$1" "${mpc[@]}" --out "$2/results/$1-mpc.json"
}
lane_vq() {  # DIR DATA
  stage train-vq $PY train.py --data "$2" --variant vq --out "$1/vq" --steps ${STEPS[1]} "${STATE_MODEL[@]}"
  stage decode-vq $PY decode.py --run "$1/vq" --pairs ${STEPS[2]} --val-pairs $((STEPS[2] / 10))
  plans vq "$1"
}
lane_la_policies() {  # DIR DATA
  stage decode-la $PY decode.py --run "$1/la" --pairs ${STEPS[2]} --val-pairs $((STEPS[2] / 10))
  plans la "$1"
  # the action adapter: the same labels, spent on planning real actions through the label-free model
  stage adapter-la $PY decode.py --run "$1/la" "${ADAPTER[@]}" --pairs ${STEPS[2]} --val-pairs $((STEPS[2] / 10))
  stage plan-la-adapter-open-loop $PY plan.py --run "$1/la" --via adapter "${open[@]}" \
    --out "$1/results/la-adapter-open-loop.json"
  local a i=3
  for a in gcbc iql; do
    stage "train-$a" $PY policy.py train --algo $a --data "$2" --tokens state --out "$1/$a" --steps ${STEPS[i++]}
    stage "policy-$a-open-loop" $PY policy.py eval --policy "$1/$a" "${open[@]}" --out "$1/results/$a-open-loop.json"
    stage "policy-$a-mpc" $PY policy.py eval --policy "$1/$a" "${mpc[@]}" --out "$1/results/$a-mpc.json"
  done
}

if [ "$mode" = quick ] || [ "$mode" = state ]; then
  DATA=${DATA:-$OUT/data}
  # steps: baseline, la/vq, decoder pairs, gcbc, iql | tasks: open loop, its ceiling, mpc, its ceiling
  if [ "$mode" = quick ]; then
    EPISODES=600 STEPS=(3000 1200 20000 3000 1200) N=(50 4 30 2)
  else
    EPISODES=2000 STEPS=(12000 12000 100000 8000 8000) N=(100 100 50 50)  # the ceiling on every task
  fi
  [ -f "$DATA/meta.json" ] || stage collect $PY data.py collect --out "$DATA" --episodes $EPISODES --steps 100
  same_data "$DATA"
  state_pipeline "$OUT" "$DATA"
fi

if [ "$mode" = labels ] || [ "$mode" = jepa-labels ]; then  # success against labelled transitions, same tasks
  DATA=${DATA:-$OUT/data}
  if [ "$mode" = labels ]; then  # state tokens: the state table's dataset and its 100 open-loop tasks
    [ -f "$DATA/meta.json" ] || stage collect $PY data.py collect --out "$DATA" --episodes 2000 --steps 100
    BUDGETS=(1000 10000 100000)  # labelled transitions (macro-action windows); the train split holds 165,600
    WM=(--steps 12000 "${STATE_MODEL[@]}") BASELINE=() GCBC=(--tokens state --steps 8000) VQ=vq
    LANE_A=(la 1000 10000) LANE_B=(vq 100000 all) first=baseline-all  # two lanes of world models, one core each
    MPC=(--protocol mpc --episodes 50 --ceiling-episodes 50 --opt-steps 10 --videos 0)  # every row under mpc too
  else  # pixels: the jepa mode's 96-px data; the label-free encoder learns from frames alone
    [ -f "$DATA/meta.json" ] ||
      stage collect $PY data.py collect --out "$DATA" --episodes 1000 --steps 100 --img-size 96
    BUDGETS=(1000 10000)
    WM=(--tokens jepa --steps 1800 --schedule cosine --batch-size 128 --depth 4 --heads 4 --dim-head 32 --mlp-dim 512
        --dropout 0 --lr-predictor 1e-3 --lr-action 1e-3 --lr-idm 1e-3 --jepa-width 16 --eval-every 300
        --val-batches 8 --log-every 50 --num-workers 1 --idm-depth 2 --idm-heads 4 --idm-dim 64 --idm-mlp-dim 128)
    BASELINE=(--jepa-idm 1.0) GCBC=() VQ=  # the labels-only baselines: PLDM's IDM term, on the same N windows
    LANE_A=(la) LANE_B=("" 1000 10000) first=baseline-1000 MPC=()
  fi
  same_data "$DATA"
  open=(--protocol open-loop --episodes 100 --ceiling-episodes 100 --opt-steps 10 --videos 0)  # ceiling: every task
  LA=(--latent-dim 4 --cond-dim 4)  # a narrow latent: an action, not the next state (README experiment log)
  # pixels: SIGReg on the token changes too (wm.py --jepa-delta), or the label-free encoder drops the agent
  [ "$mode" = labels ] || LA+=(--jepa-delta 0.09)
  wm_lane() {  # VARIANT N...: the label-free world model, then baselines trained on N labelled windows (all: every one)
    local v=$1 n; shift
    [ -z "$v" ] || stage "train-$v" $PY train.py --data "$DATA" --variant $v --out "$OUT/$v" "${WM[@]}" \
      $([ $v = la ] && echo "${LA[@]}")
    for n in "$@"; do
      stage "train-baseline-$n" $PY train.py --data "$DATA" --variant baseline --out "$OUT/baseline-$n" \
        --labels $([ $n = all ] && echo -1 || echo $n) "${WM[@]}" "${BASELINE[@]}"
    done
  }
  plan_row() {  # NAME ARGS...: plan.py on the open-loop tasks, and on the mpc tasks when the mode has them
    local name=$1; shift
    stage "plan-$name" $PY plan.py "$@" "${open[@]}" --out "$OUT/results/$name.json"
    [ -z "${MPC[*]}" ] || stage "plan-$name-mpc" $PY plan.py "$@" "${MPC[@]}" --out "$OUT/results/$name-mpc.json"
  }
  head_lane() {  # VARIANT: its decoder and adapter at every budget (90 % train, 10 % val pairs), each planned
    local v=$1 n h
    for n in "${BUDGETS[@]}"; do for h in decoder adapter; do
      stage "$h-$v-$n" $PY decode.py --run "$OUT/$v" $([ $h = decoder ] || echo "${ADAPTER[@]}") \
        --pairs $((n * 9 / 10)) --val-pairs $((n / 10))
      plan_row "$v-$h-$n" --run "$OUT/$v" --via $h
    done; done
  }
  plan_baselines() {
    local n
    for n in "${BUDGETS[@]}"; do plan_row "baseline-$n" --run "$OUT/baseline-$n"; done
  }
  la_gcbc_lane() {  # GCBC on N labels: N / 5 chunks of 5 labelled macro actions (state tokens)
    local n
    head_lane la
    [ -n "${GCBC[*]}" ] || return 0
    for n in "${BUDGETS[@]}"; do
      stage "train-gcbc-$n" $PY policy.py train --algo gcbc --data "$DATA" --out "$OUT/gcbc-$n" --labels $n \
        "${GCBC[@]}"
      stage "policy-gcbc-$n" $PY policy.py eval --policy "$OUT/gcbc-$n" "${open[@]}" --out "$OUT/results/gcbc-$n.json"
      [ -z "${MPC[*]}" ] || stage "policy-gcbc-$n-mpc" $PY policy.py eval --policy "$OUT/gcbc-$n" "${MPC[@]}" \
        --out "$OUT/results/gcbc-$n-mpc.json"
    done
  }
  vq_baselines_lane() { [ -z "$VQ" ] || head_lane vq; plan_baselines; }
  background lane-la wm_lane "${LANE_A[@]}"
  background lane-vq wm_lane "${LANE_B[@]}"
  join
  # both cores: the ceilings (simulator as the planner's model), cached for every later row
  plan_row "$first" --run "$OUT/$first"
  background lane-la-gcbc la_gcbc_lane
  background lane-vq-baselines vq_baselines_lane
  join
  rm -f "$OUT/.done/eval"
  stage eval $PY eval.py --run "$OUT/$first" "$OUT/la" ${VQ:+"$OUT/vq"} --results "$OUT"/results/*.json \
    --out "$OUT/metrics.json" --windows 600 --probe-windows 5000
fi

if [ "$mode" = jepa ]; then  # 96-px frames, a 4-block CNN + BN projector trained with the predictor (dino.JEPAEncoder)
  DATA=${DATA:-$OUT/data}
  [ -f "$DATA/meta.json" ] || stage collect $PY data.py collect --out "$DATA" --episodes 1000 --steps 100 --img-size 96
  same_data "$DATA"
  # --jepa-idm 1: PLDM's inverse-dynamics term (action labels, so baseline only); without it the agent is not encoded
  stage train-baseline $PY train.py --data "$DATA" --variant baseline --tokens jepa --out "$OUT/baseline" --steps 1800 \
    --schedule cosine --batch-size 128 --depth 4 --heads 4 --dim-head 32 --mlp-dim 512 --dropout 0 --lr-predictor 1e-3 \
    --lr-action 1e-3 --jepa-width 16 --jepa-idm 1.0 --eval-every 300 --val-batches 8 --log-every 50 --num-workers 1
  stage plan-baseline-open-loop $PY plan.py --run "$OUT/baseline" --protocol open-loop --episodes 100 \
    --ceiling-episodes 100 --opt-steps 10 --out "$OUT/results/baseline-open-loop.json"
  rm -f "$OUT/.done/eval"
  stage eval $PY eval.py --run "$OUT/baseline" --results "$OUT"/results/*.json --out "$OUT/metrics.json" \
    --windows 600 --probe-windows 5000
fi

if [ "$mode" = full ]; then  # DINOv2 tokens with the seed's recipe (batch 64, 100k decoder pairs), 2/3 of its steps
  DATA=${DATA:-$OUT/data}
  W=${DINO_WEIGHTS:-}
  FEATURES=${FEATURES:-auto}
  FRAMES=$((10000 * 101))  # what `data.py collect --episodes 10000 --steps 100` writes (only read before it exists)
  TARGET=3600  # GPU-seconds the whole seed table should take on one H200
  TRAIN=(--data "$DATA" --tokens dinov2 ${W:+--dino-weights "$W"})
  SEED_STEPS=162000  # the seed: 10 epochs of its 10k-episode subset at batch 64
  STEPS=${STEPS:-108000}  # two thirds of that, so that the seed table fits one GPU-hour (STEPS=162000: the seed's)
  WM=(--steps $STEPS --eval-every 10000)  # validation + checkpoint every 10k steps instead of 2k (~8 % of la/vq)
  PLANS=("open-loop 10" "mpc 30")  # protocol, CEM iterations: the seed's open loop ran 10, stable-worldmodel's mpc 30
  POLICY_STEPS=20000  # GCBC and IQL (policy.py) on the same DINOv2 tokens

  full_plan() {  # train.py --dry-run per variant (FLOPs from the layer sizes; no weights, no data needed), the verdict
    rm -rf "$OUT/plan"; mkdir -p "$OUT/plan"
    echo "== plan of \`reproduce.sh full\` in $OUT: estimates from FLOPs counted on the layer sizes, not measurements"
    echo "recipe: the seed's (see README), except $STEPS world-model steps (the seed: $SEED_STEPS; STEPS=N sets it)," \
         "IDM depth 4 (the seed: 12), validation every 10k steps"
    [ -f "$DATA/meta.json" ] && echo "collect: $DATA exists" ||
      echo "collect: 10000 episodes x 101 = $FRAMES frames into $DATA (CPU; ~65 MB of states, frames are rendered)"
    train_plans() {  # FEATURE MODE -> OUT/plan/train-V.{txt,rc}; 0 when every variant's plan fits
      local v ok=0
      for v in baseline la vq; do
        (set +e; $PY train.py "${TRAIN[@]}" "${WM[@]}" --variant $v --out "$OUT/$v" --features $1 --frames $FRAMES \
          --dry-run > "$OUT/plan/train-$v.txt" 2>&1; echo $? > "$OUT/plan/train-$v.rc") &
      done; wait
      for v in baseline la vq; do [ "$(cat "$OUT/plan/train-$v.rc")" = 0 ] || ok=1; done
      return $ok
    }
    case $FEATURES in  # auto: the fp16 disk cache when the disk holds it, else int8 in GPU memory, else DINOv2 per batch
      auto) for FEAT in cache memory off; do train_plans $FEAT && break
              echo "  --features $FEAT: $(grep -h "^error" "$OUT/plan/train-la.txt")"; done ;;
      *) FEAT=$FEATURES; train_plans $FEAT ||
           { grep -h "^error" "$OUT"/plan/train-*.txt | sort -u >&2; exit 2; } ;;
    esac
    echo "feature mode: $FEAT (FEATURES=$FEATURES)"
    grep -h "^train.py --dry-run" "$OUT"/plan/train-*.txt | sed 's/^/  /'
    echo "  gcbc, iql: MLPs over 196 x 16 projected patches, ${POLICY_STEPS} steps each (not FLOP-counted; beyond the" \
         "seed table); eval: forward passes over ~6k windows, well under a minute"
    echo "stage                        GPU-s"
    cat "$OUT"/plan/train-*.txt |
      awk -v target=$TARGET -v steps=$STEPS -v seed=$SEED_STEPS '/^estimate /{sub(":", "", $2); if (seen[$2]++) next
                                          s += $3; if ($2 ~ /^train-/) t += $3; printf "  %-24s %7d\n", $2, $3}
        END {printf "total: %d GPU-s = %.2f GPU-h on one H200 at the assumed rate (target %.1f GPU-h: %s)\n", s,
             s / 3600, target / 3600, s <= target ? "fits" : "OVER, see below"
             if (steps != seed) printf "  with the seed'"'"'s %d steps (STEPS=%d): ~%.2f GPU-h (training is linear " \
             "in steps)\n", seed, seed, (s + t * (seed / steps - 1)) / 3600
             exit s > target}' && return
    echo "Over the target. Nothing is changed silently; the levers, each a flag:"
    echo "  - FEATURES=cache or memory when it says off: DINOv2 paid once per frame, not twice per window"
    echo "  - --idm-depth (la, vq): the seed's 12 costs 3.6x our 4"
    echo "  - --steps (linear): 162k = 10 epochs of the seed's 10k-episode subset"
  }

  full_plan
  [ $dry = 1 ] && exit 0
  $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())" ||
    { echo "error: reproduce.sh full needs a CUDA GPU; none is visible (\`state\`: the CPU table)" >&2; exit 2; }
  [ -f "$DATA/meta.json" ] || stage collect $PY data.py collect --out "$DATA" --episodes 10000 --steps 100
  same_data "$DATA"
  [ "$FEAT" != cache ] || stage encode $PY dino.py encode --data "$DATA" ${W:+--dino-weights "$W"}
  for v in baseline la vq; do
    stage "train-$v" $PY train.py "${TRAIN[@]}" "${WM[@]}" --variant "$v" --out "$OUT/$v" --features $FEAT
  done
  for v in la vq; do stage "decode-$v" $PY decode.py --run "$OUT/$v"; done
  for v in baseline la vq; do for p in "${PLANS[@]}"; do set -- $p
    stage "plan-$v-$1" $PY plan.py --run "$OUT/$v" --protocol $1 --opt-steps $2 --out "$OUT/results/$v-$1.json"
  done; done
  for a in gcbc iql; do
    stage "train-$a" $PY policy.py train --algo $a "${TRAIN[@]}" --out "$OUT/$a" --steps $POLICY_STEPS --features $FEAT
    for p in "${PLANS[@]}"; do set -- $p
      stage "policy-$a-$1" $PY policy.py eval --policy "$OUT/$a" --protocol $1 --opt-steps $2 \
        --out "$OUT/results/$a-$1.json"
    done
  done
  rm -f "$OUT/.done/eval"
  stage eval $PY eval.py --run "$OUT/baseline" "$OUT/la" "$OUT/vq" --results "$OUT"/results/*.json \
    --out "$OUT/metrics.json"
fi

if [ "$mode" = gpu-check ]; then  # one short run of every CUDA path: bf16, compile, DDP over NCCL, encode, CEM
  W=${DINO_WEIGHTS:-random}  # the GPU box has no DINOv2 weights: speed only, the numbers mean nothing for quality
  rm -rf "$OUT/.done" "$OUT/data" "$OUT/fast" "$OUT/memory" "$OUT/ref" "$OUT/ddp"; mkdir -p "$OUT/.done"
  VQ=(--data "$OUT/data" --variant vq --tokens dinov2 --dino-weights "$W" --val-batches 1 --stats-batches 1
      --log-every 10)
  stage collect $PY data.py collect --out "$OUT/data" --episodes 64 --steps 100
  stage encode $PY dino.py encode --data "$OUT/data" --dino-weights "$W"  # bf16 autocast; images/s into features.json
  stage train-optimised $PY train.py "${VQ[@]}" --out "$OUT/fast" --steps 80 --eval-every 80  # bf16, compile, cache
  stage train-memory $PY train.py "${VQ[@]}" --out "$OUT/memory" --steps 60 --eval-every 60 --features memory
  stage train-reference $PY train.py "${VQ[@]}" --out "$OUT/ref" --steps 30 --eval-every 30 --no-compile \
    --features off --dtype float32
  stage ddp-nccl $PY -m torch.distributed.run --standalone --nproc_per_node 1 train.py "${VQ[@]}" --out "$OUT/ddp" \
    --steps 2 --eval-every 2 --no-compile
  stage decode $PY decode.py --run "$OUT/fast" --pairs 2000 --val-pairs 200 --max-epochs 2
  for it in 10 30; do  # the seed's sizes: 300 samples, horizon 5, 196 tokens; rollout_cost compiled (cached 2nd time)
    stage "plan-300x$it" $PY plan.py --run "$OUT/fast" --episodes 16 --opt-steps $it --ceiling-episodes 0 --videos 0 \
      --out "$OUT/plan-300x$it.json"
  done
  $PY - "$OUT" "$W" <<'EOF'
import json, sys
from pathlib import Path
import torch
out, weights = Path(sys.argv[1]), sys.argv[2]
def train(run):  # log intervals after the first (compile and warm-up excluded); peak memory since the process began
    rows = [json.loads(line) for line in open(out / run / "log.jsonl") if '"samples_per_s"' in line]
    keep = rows[1:] or rows
    return {"samples_per_s": sum(r["samples_per_s"] for r in keep) / len(keep), "peak_gpu_gb": rows[-1]["peak_mem_gb"],
            "world_model_tflops": sum(r["tflops"] for r in keep) / len(keep)}  # encoder excluded
fast, mem, ref = train("fast"), train("memory"), train("ref")
enc = json.loads((out / "data/train/features.json").read_text())
plans = {k: json.loads((out / f"plan-{k}.json").read_text()) for k in ("300x10", "300x30")}
result = {
    "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "dino_weights": weights,
    "note": "DINOv2 weights are random unless dino_weights says otherwise: speed only; every CUDA path ran once "
            "(bf16 autocast, torch.compile of predictor, IDM and rollout_cost, DDP over NCCL via torchrun, encode)",
    "train_optimised": {**fast, "path": "vq, batch 64: bf16 autocast + torch.compile + feature cache"},
    "train_memory": {**mem, "path": "vq, batch 64: bf16 autocast + torch.compile + int8 features in GPU memory"},
    "train_reference": {**ref, "path": "vq, batch 64: --no-compile --features off --dtype float32"},
    "train_speedup": fast["samples_per_s"] / ref["samples_per_s"],
    "encode": {"images_per_s": enc["images_per_s"], "peak_gpu_gb": enc["peak_gpu_gb"], "dtype": enc["dtype"],
               "note": "includes rendering the frames on the CPU loader workers"},
    **{f"cem_{k}": {"seconds_per_solve": r["seconds_per_solve"], "batch_episodes": r["batch_episodes"],
                    "peak_gpu_gb": r["peak_gpu_gb"], "planner": r["planner"]} for k, r in plans.items()},
}
(out / "gpu-check.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
print(f"wrote {out / 'gpu-check.json'}")
EOF
fi

if [ "$mode" = quick ]; then  # the pixel path: DINOv2 (random weights unless given), tiny, to show that it runs
  P=$OUT/pixels
  mkdir -p "$P/.done"
  : > "$P/.timings"
  W=${DINO_WEIGHTS:-random}
  OUT=$P stage collect $PY data.py collect --out "$P/data" --episodes 24 --steps 60 --img-size 64
  OUT=$P stage encode $PY dino.py encode --data "$P/data" --size 56 --dino-weights "$W"
  for v in baseline vq; do
    OUT=$P stage "train-$v" $PY train.py --data "$P/data" --variant "$v" --out "$P/$v" --dino-size 56 \
      --dino-weights "$W" --steps 60 --batch-size 16 --eval-every 60 --log-every 20 --val-batches 2 --stats-batches 2 \
      --depth 2 --heads 4 --dim-head 32 --mlp-dim 256 --idm-depth 1 --idm-heads 4 --idm-dim 128 --idm-mlp-dim 256 \
      --num-workers 0
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
cat "$OUT/.timings" ${P:+"$P/.timings"} |
  while read -r name s; do printf '  %-24s %6s s\n' "$name" "$s"; done
if [ "$mode" = quick ]; then
  echo "State tokens ($OUT/metrics*.json, results/): the method, learned in minutes. Pixels ($OUT/pixels/): a smoke run"
  echo "of the DINOv2 path with ${W:-random} weights: its numbers say only that every stage runs."
fi
