#!/usr/bin/env bash
# Prepares the lent GPU machine (the device tool: no registry, no TensorFlow) and runs "$@".
# Needs .gpu/ carried (see ../shared/GPU-RECIPE.md): wheels for ml_collections and clu, the
# CIFAR-10 JPEG pack and its converter. Usage (device tool, carry [".gpu"]):
#     bash launch/device.sh python -m resnet_ensemble --config=... --config.data.dir=.gpu/data
set -eo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target .gpu/site .gpu/whl/*.whl
export PYTHONPATH="$PWD/.gpu/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu/data/cifar-10-batches-bin ] || python3 .gpu/make_cifar10_bin.py .gpu/data
"$@"
