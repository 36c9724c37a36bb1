#!/usr/bin/env bash
# The CPU speed table: each workload timed by the JAX side and by PyTorch (bench/torch_resnet.py)
# one after the other on the same machine, then the ratios (bench/cpu_ratios.py).
#
#   bash bench/cpu_rows.sh              # OUT=/tmp/bench_cpu by default; ~10 min on 2 cores
#   ROWS="quickstart r20" bash bench/cpu_rows.sh
#
# Rows: quickstart (one run of configs/quickstart.py's ResNet-20, width 8, 8x8 digits, batch 64); r20 and
# r110 (the default config's CIFAR ResNet-20/110 at batch 128: pre-activation, projection
# shortcuts) and the same post-activation with option A (r20a, r110a: the reference's network);
# eval (ResNet-110 forward, batch 500); e6 (post-activation option-A ResNet-110: the reference
# routes one path per backward through that network's blocks; batch 128).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench_cpu}
ROWS=${ROWS:-quickstart r20 r110 r20a r110a eval e6}
mkdir -p "$OUT"
J="$OUT/bench.jsonl"
export PYTHONUNBUFFERED=1
R110="--config=configs/cifar10_resnet110.py"
A="--config.model.block_form=postact --config.model.shortcut=zero_pad"
TORCH_DEFAULT="--preact --shortcut=projection"
for row in $ROWS; do
  echo "== $row" >&2
  case $row in
    quickstart)
      python bench/train_step.py --config=configs/quickstart.py "--config.stack=()" --calls=20 \
          --num_examples=2000 --variant=quickstart --out="$J"
      python bench/torch_side.py --cpu --depth=20 --width=8 --preact --shortcut=projection \
          --in_channels=1 --image=8 --train_batch=64 --rows=train128_fp32 --out="$J" ;;
    r20|r110|r20a|r110a)
      depth=${row#r}; depth=${depth%a}
      jax_form=""; torch_form=$TORCH_DEFAULT
      [[ $row == *a ]] && { jax_form=$A; torch_form=""; }
      python bench/train_step.py $R110 $jax_form --config.model.depth=$depth --calls=3 \
          --config.train.steps_per_call=3 --num_examples=2000 --variant=$row --out="$J"
      python bench/torch_side.py --cpu --depth=$depth $torch_form --rows=train128_fp32 \
          --out="$J" ;;
    eval)
      python bench/eval_forward.py $R110 --batch_sizes=500 --num_images=2000 --calls=2 --out="$J"
      python bench/torch_side.py --cpu --depth=110 $TORCH_DEFAULT --rows=eval --out="$J" ;;
    e6)
      python bench/path_sampling.py $R110 $A --config.paths.samples_per_k=2 --config.paths.chunk=10 \
          --fwd_bwd_calls=2 --time_cap_s=60 --out="$J"
      python bench/torch_side.py --cpu --depth=110 --rows=paths_E6 --out="$J" ;;
    *) echo "unknown row $row (quickstart r20 r110 r20a r110a eval e6)" >&2; exit 2 ;;
  esac
done
python bench/cpu_ratios.py "$J" | tee "$OUT/table.md"
