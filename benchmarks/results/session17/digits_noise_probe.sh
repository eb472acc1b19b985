#!/usr/bin/env bash
# digits: does any neuron-noise attack from scratch cross FKD? (issue 19 probe)
export OMP_NUM_THREADS=1
R=/work/main/.venv/bin/robustkd
C="--model wrn16_2 --dataset digits --epochs 15 --lr 0.05 --schedule cosine --batch-size 64 --target 0 --device cpu --no-progress --eval-every 15"
D="--student wrn10_1 --epochs 15 --lr 0.05 --batch-size 64 --device cpu --no-progress --eval-every 15"
for spec in "badnets-neuron-noise:--poison-ratio 0.1" "blended-neuron-noise:--poison-ratio 0.1 --blended-neuron-noise-alpha 0.2" "badnets:--poison-ratio 0.1" "blended:--poison-ratio 0.1 --blended-alpha 0.2"; do
  a=${spec%%:*}; extra=${spec#*:}
  $R attack --attack $a $C $extra --out $a-t 2>&1 | tail -1
  $R distill --method fkd --teacher $a-t $D --out $a-fkd 2>&1 | tail -1
done
