#!/usr/bin/env bash
# Short training runs of every trainer path, to check that a change of the code changes no figure:
# cached necks, a multi neck with identity loss and ema, a resume, stripes + rings with the nonzero
# reducer, both kinds of adapt rounds, an attribute probe, the street pointing loss, uncached images.
#
#   bash benchmarks/reference_runs.sh SRC_ROOT RUNS_DIR        # the code in SRC_ROOT/src, e.g. a git worktree
#   python benchmarks/compare_runs.py RUNS_BEFORE RUNS_AFTER   # JSON: which metrics files agree
#
# Run from the repository root (the configs' ../shared/data paths), with the virtual environment
# active. CONFIGS=DIR takes the configs from DIR (default SRC_ROOT/configs), so that both runs read
# the very same files. About 40 minutes on 2 cores, feature caches included.
set -euo pipefail
SRC=$1; R=$2; mkdir -p "$R"
export PYTHONPATH="$SRC/src"
C=${CONFIGS:-$SRC/configs}
fl() { echo "+ fashionlens $*" >&2; python -m fashionlens "$@"; }
fl train $C/necks-cached-cpu.yaml --epochs 2 --set batches_per_epoch=15 --set feature_cache=$R/cache-224 --out $R/necks
fl train $C/recipe-cached-cpu.yaml --epochs 2 --set batches_per_epoch=15 --set feature_cache=$R/cache-224 --out $R/recipe
fl train $C/recipe-cached-cpu.yaml --epochs 3 --set batches_per_epoch=15 --set feature_cache=$R/cache-224 --out $R/recipe
fl train $C/necks-cached-cpu.yaml --epochs 1 --set batches_per_epoch=10 --set feature_cache=$R/cache-224 \
   --set 'model.neck={type: multi, necks: {s: {type: stripes, parts: [2], dim: 64}, r: {type: rings, rings: 2}}}' \
   --set identity=0.5 --set reducer=nonzero --out $R/stripes-rings
fl adapt $C/adapt-cpu.yaml --rounds 1 --set train.epochs=1 --set train.batches_per_epoch=8 --set init=$R/recipe/best \
   --set train.feature_cache=$R/cache-b6 --out $R/adapt-photo
fl adapt $C/adapt-cpu.yaml --rounds 1 --set assign=new --set m=10 --set queries=200 --set train.epochs=1 \
   --set train.batches_per_epoch=8 --set init=$R/recipe/best --set train.feature_cache=$R/cache-b6 \
   --set mined_share=0.3 --out $R/adapt-new
fl train-attributes $C/attributes-probe-cpu.yaml --epochs 3 --set feature_cache=$R/cache-attr-224 --out $R/attr-probe
fl train-attributes $C/street-pointing-cpu.yaml --epochs 2 --set feature_cache=$R/cache-street-320 --out $R/street
fl train $C/train-cpu.yaml --epochs 1 --set batches_per_epoch=2 --set workers=0 --set k=2 --out $R/uncached
