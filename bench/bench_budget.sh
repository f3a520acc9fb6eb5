#!/usr/bin/env bash
# Budget accuracy (issue 17): a 3-minute pretrain budget, quiet and with a competing process taking one of the two cores from minute 1 on.
#     bash bench/bench_budget.sh DATA_DIR [WORK_DIR]      # from the repository root, with .venv installed
set -u
D=${1:?a data dir written by tinylm data prepare (e.g. runs/quickstart/data)}
W=${2:-bench-work/budget}; mkdir -p "$W"
for mode in quiet contended; do
  out=$W/$mode; rm -rf $out
  start=$(date +%s.%N)
  .venv/bin/python -m tinylm pretrain --config tinylm/recipes/quickstart.yaml --data.dir $D --run.out $out \
      --run.minutes 3 --schedule.steps none > $W/$mode.log 2>&1 &
  pid=$!
  if [ $mode = contended ]; then sleep 60; python3 -c "while True: pass" & hog=$!; fi
  wait $pid
  end=$(date +%s.%N)
  [ $mode = contended ] && kill $hog
  echo "$mode: process $(python3 -c "print(round($end-$start,1))") s; last step $(tail -1 $out/metrics.jsonl | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print(d["step"], d.get("time_s"))')"
done
