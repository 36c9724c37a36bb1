#!/usr/bin/env bash
# Why did every JAX bench step time out without a line on the H100 (2026-11-27 call 1)?
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
python3 -m pip install -q --no-index --no-deps --target .gpu/site .gpu/whl/*.whl
export PYTHONPATH="$PWD/.gpu/site:$PWD"
{ date; nvidia-smi; } > "$OUT/diag.log" 2>&1
R110="--config=configs/cifar10_resnet110.py --config.model.dtype=bfloat16 --config.model.unroll=0"
run() { local cap=$1; shift; echo "== $* (cap $cap s)" | tee -a "$OUT/diag.log"
  ( time timeout -s ABRT "$cap" "$@" ) 2>&1 | grep -v "^I1\|^W1\|^I0000\|^WARNING: All log" | tee -a "$OUT/diag.log"; }
run 70 python3 bench/eval_forward.py $R110 --batch_sizes=1000 --calls=5 --out="$OUT/bench.jsonl"
run 90 python3 bench/train_step.py $R110 --config.train.steps_per_call=50 --calls=4 \
  --time_cap_s=4 --out="$OUT/bench.jsonl"
