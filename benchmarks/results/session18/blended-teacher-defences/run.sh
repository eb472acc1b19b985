#!/usr/bin/env bash
# BackdoorBench direction check on the Blended-from-scratch teacher: fine-tuning vs ANP (500 batches) vs I-BAU
set -u
cd /work/bench-src
export ROBUSTKD_CACHE_DIR=/tmp/rkdcache PYTHONPATH=/work/bench-src/src OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
T=runs/bench/runs/bench-cifar10-wrn16_2-blended-scratch-11a634ad72
for d in finetune "anp --anp-iterations 500" ibau; do
  name=${d%% *}
  date; echo "== $d"
  /usr/bin/time -f "%e s wall" $PY -m robustkd defend --run $T --defense $d --clean-fraction 0.2 --clean-seed 0 --seed 0 --no-progress --out /work/defchk/blended-$name $( [ $name = ibau ] && echo --ibau-max-images 2500 )
done
date; echo DEFCHK DONE
