#!/bin/bash
# project fractals dataset: teacher (blended stripes a0.2), then FKD student on half the data
cd /work/s29
export OMP_NUM_THREADS=1 ROBUSTKD_CACHE_DIR=/tmp/rkdcache PYTHONPATH=/work/main/src
R=/work/main/.venv/bin/robustkd
date -u +%T
$R attack --dataset fractals --model wrn16_2 --epochs 8 --lr 0.05 --schedule cosine --batch-size 64 --target 0 --eval-every 8 --no-progress --out runs/fr-teacher --attack blended --blended-alpha 0.2 --blended-blend-pattern stripes --poison-ratio 0.1
date -u +%T
$R distill --method fkd --teacher runs/fr-teacher --student wrn16_1 --epochs 8 --lr 0.05 --batch-size 64 --eval-every 8 --no-progress --clean-fraction 0.5 --out runs/fr-fkd-half
date -u +%T
