#!/bin/bash
# fractal probe: DATASET TAG ATTACK-ARGS...
cd /work/s29
export OMP_NUM_THREADS=1 ROBUSTKD_CACHE_DIR=/tmp/rkdcache
R=/work/main/.venv/bin/robustkd
D=$1; T=$2; shift 2
date -u +%T
$R attack --dataset $D --data-root /work/s29/data --model wrn16_2 --epochs 8 --lr 0.05 --schedule cosine --batch-size 64 --target 0 --eval-every 8 --no-progress --out runs/$T-teacher "$@"
date -u +%T
$R distill --method fkd --teacher runs/$T-teacher --student wrn16_1 --epochs 8 --lr 0.05 --batch-size 64 --eval-every 8 --no-progress --out runs/$T-fkd
date -u +%T
