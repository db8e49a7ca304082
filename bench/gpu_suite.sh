#!/usr/bin/env bash
# The full-schedule results table on one GPU, in one command (~10 minutes).
#
#   bench/gpu_suite.sh              # run it (needs jax with CUDA and a GPU)
#   bench/gpu_suite.sh --dry-run    # print the lanes and train.py commands
#   bench/gpu_suite.sh --budget-s 300 --seeds "0 1"
#
# Runs vgg16, resnet20 and resnet18 under direct, he2024 and musco, and the
# shared-ADTN VGG-16 classifier (configs/vgg16_adtn.py), on their full
# schedules (bench/results.py FULL_SETTINGS: the configs' epochs on all
# training images), as bench/results.py rows tagged with the GPU's name
# (keys '<device>:<model>/<pipeline>/<seed>' in docs/results.json), then
# rewrites docs/results.md. These models leave most of an H100 idle, so
# seven lanes share the GPU: per model one lane runs direct then musco (from
# direct's baseline), another he2024; the ADTN lane waits for the vgg16
# baseline. At --budget-s every lane kills its run in progress and starts no
# other; run the same command again and the killed runs resume from their
# checkpoints and the finished rows are skipped (--skip-done). Never run by
# the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
[[ -x .venv/bin/python && $PYTHON == python ]] && PYTHON=.venv/bin/python
DRY_RUN=0
BUDGET_S=540
SEEDS=0
usage() {
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  echo "options: --dry-run  --budget-s SECONDS (default $BUDGET_S)" \
       " --seeds 'S ...' (default $SEEDS)"
}
while (($#)); do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --budget-s) BUDGET_S=${2:?--budget-s needs a value}; shift ;;
    --seeds) SEEDS=${2:?--seeds needs a value}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
[[ $BUDGET_S =~ ^[0-9]+$ ]] || { echo "--budget-s must be an integer" >&2; exit 2; }
[[ $SEEDS =~ ^[0-9\ ]+$ ]] || { echo "--seeds must be integers" >&2; exit 2; }

if ((DRY_RUN)); then
  DEVICE=DEVICE
else
  DEVICE=$("$PYTHON" -c 'import jax; d = jax.devices()[0]; print(d.device_kind if d.platform == "gpu" else "")' | tail -n 1)
  if [[ -z $DEVICE ]]; then
    echo "gpu_suite.sh: no GPU visible to JAX ($PYTHON); install jax[cuda12]" >&2
    exit 3
  fi
  # Fail in seconds, not in seven lanes, when the data is missing.
  "$PYTHON" -c 'from lowrank_jax.train import data; data.load_dataset()' || {
    echo "gpu_suite.sh: Fashion-MNIST not loadable (see the error above)" >&2
    exit 3; }
fi
SLUG=$(echo "$DEVICE" | sed 's/[^A-Za-z0-9]\+/_/g; s/^_//; s/_$//')
ROOT=runs/results_${SLUG}_full
LOGS=$ROOT/lanes
# Several processes share the GPU: allocate on demand, not 75% each.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

common=(--schedule full --device "$DEVICE" --seeds $SEEDS --skip-done
        --deadline-s "$BUDGET_S")
lanes=(
  "resnet18 direct musco" "resnet18 he2024"
  "vgg16 direct musco" "vgg16 he2024"
  "resnet20 direct musco" "resnet20 he2024"
  "vgg16_adtn adtn"
)

lane() {  # lane <model> <pipeline...>
  local model=$1; shift
  "$PYTHON" bench/results.py "${common[@]}" --models "$model" \
    --pipelines "$@" "${extra[@]}"
}

if ((DRY_RUN)); then
  extra=(--dry-run)
  for l in "${lanes[@]}"; do
    echo "# lane: $PYTHON bench/results.py ${common[*]} --models ${l%% *} --pipelines ${l#* }"
    lane $l | grep -v '^total'
  done
  echo "# then: $PYTHON bench/write_results_md.py"
  exit 0
fi

extra=()
mkdir -p "$LOGS"
start=$(date +%s)
pids=()
for l in "${lanes[@]}"; do
  name=${l// /_}
  if [[ $l == vgg16_adtn* ]]; then
    (  # The ADTN job starts from the vgg16 direct run's baseline.
      for seed in $SEEDS; do
        until [[ -d $ROOT/vgg16_direct_s$seed/stages/baseline ]]; do
          (( $(date +%s) - start < BUDGET_S - 60 )) || {
            echo "# no vgg16 baseline for seed $seed before the budget"; exit 0; }
          sleep 10
        done
      done
      common[-1]=$((BUDGET_S - ($(date +%s) - start)))
      lane $l
    ) > "$LOGS/$name.log" 2>&1 &
  else
    lane $l > "$LOGS/$name.log" 2>&1 &
  fi
  pids+=($!)
  echo "lane $l: pid $!, log $LOGS/$name.log"
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
echo "lanes done after $(( $(date +%s) - start )) s (status $status)"
grep -h '^# ' "$LOGS"/*.log || true
"$PYTHON" bench/write_results_md.py
exit $status
