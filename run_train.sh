#!/bin/sh
# Train or evaluate SkySense-O through train_net.py. With no options it runs the quick start:
# it prepares the sample images (tools/prepare_quickstart.py), trains the tiny model on them and
# evaluates it on the held-out images. Run "sh run_train.sh --help" for the options.
set -eu

usage() {
  cat <<'USAGE'
Usage: sh run_train.sh [options] [-- KEY VALUE ...]

Without -c, trains the quick-start model on the sample images (configs/quickstart.yaml).

Options:
  -c FILE   config file (default: configs/quickstart.yaml, which also prepares the samples)
  -n NAME   run name; outputs go to output/NAME (default: the config file's name)
  -w FILE   initial weights (MODEL.WEIGHTS); with -e, the weights to evaluate
  -e        evaluate only (python train_net.py --eval-only)
  -g N      number of GPUs (default: 1 when CUDA is available, else the CPU)
  -v W      weight of the vision-centric regulariser (>= 0)
  -r W      weight of the region-text contrast loss (>= 0)
  -s S      contrast scale of the region losses (> 0)
  -t N      text batch: class names per training image (positive integer)
  -h L,L,H,H  sampling thresholds neg_low,neg_high,pos_low,pos_high (integers 1..10)
  -a        enable retrieval augmentation (class synonyms) at evaluation
  -d        debug: one data-loader worker and an evaluation every 20 iterations
  --help    show this help

Anything after "--" is passed to train_net.py as config overrides, e.g. -- SOLVER.MAX_ITER 100.
USAGE
}

fail() {
  echo "run_train.sh: $1" >&2
  echo "Run 'sh run_train.sh --help' for the options." >&2
  exit 2
}

is_number() { echo "$1" | grep -Eq '^[0-9]+([.][0-9]+)?([eE][-+]?[0-9]+)?$'; }
is_positive_integer() { echo "$1" | grep -Eq '^[1-9][0-9]*$'; }

if [ "${1:-}" = "--help" ]; then
  usage
  exit 0
fi
for argument in "$@"; do
  [ "$argument" = "--" ] && break
  case "$argument" in
    --help) usage; exit 0 ;;
    --*) fail "unknown option $argument; --help is the only long option (the config file is -c FILE)" ;;
  esac
done

cd "$(dirname "$0")"
# The project's own environment (tools/setup_env.sh) comes first, then python from PATH.
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  PYTHON=.venv/bin/python
fi
python="${PYTHON:-python}"
config=""
name=""
weights=""
eval_only=0
num_gpus=""
debug=0

overrides=""
add_override() { overrides="$overrides $1 $2"; }

while getopts ":c:n:w:eg:v:r:s:t:h:ad" option; do
  case "$option" in
    c) [ -f "$OPTARG" ] || fail "config file '$OPTARG' (-c) does not exist"; config="$OPTARG" ;;
    n) echo "$OPTARG" | grep -Eq '^[A-Za-z0-9._-]+$' \
         || fail "run name '$OPTARG' (-n) may only contain letters, digits, '.', '_' and '-'"
       name="$OPTARG" ;;
    w) [ -f "$OPTARG" ] || fail "weights file '$OPTARG' (-w) does not exist"; weights="$OPTARG" ;;
    e) eval_only=1 ;;
    g) is_positive_integer "$OPTARG" || fail "number of GPUs '$OPTARG' (-g) is not a positive integer"
       num_gpus="$OPTARG" ;;
    v) is_number "$OPTARG" || fail "regulariser weight '$OPTARG' (-v) is not a number >= 0"
       add_override MODEL.SKYSENSE_O.LOSS.REGULAR_WEIGHT "$OPTARG" ;;
    r) is_number "$OPTARG" || fail "region-contrast weight '$OPTARG' (-r) is not a number >= 0"
       add_override MODEL.SKYSENSE_O.LOSS.REGION_CONTRAST_WEIGHT "$OPTARG" ;;
    s) { is_number "$OPTARG" && awk -v x="$OPTARG" 'BEGIN { exit !(x + 0 > 0) }'; } \
         || fail "contrast scale '$OPTARG' (-s) is not a number > 0"
       add_override MODEL.SKYSENSE_O.LOSS.CONTRAST_SCALE "$OPTARG" ;;
    t) is_positive_integer "$OPTARG" || fail "text batch '$OPTARG' (-t) is not a positive integer"
       add_override DATASETS.SKYSA.TEXT_BATCH "$OPTARG" ;;
    h) echo "$OPTARG" | grep -Eq '^(10|[1-9]),(10|[1-9]),(10|[1-9]),(10|[1-9])$' \
         || fail "sampling thresholds '$OPTARG' (-h) must be four integers 1..10, e.g. 1,3,9,10"
       add_override DATASETS.SKYSA.SAMPLING_HYPER "[$OPTARG]" ;;
    a) add_override MODEL.SKYSENSE_O.INFERENCE.RETRIEVAL_AUGMENTATION True ;;
    d) debug=1 ;;
    :) fail "option -$OPTARG needs a value" ;;
    \?) fail "unknown option -$OPTARG" ;;
  esac
done
shift $((OPTIND - 1))
if [ $# -gt 0 ]; then
  [ "$1" = "--" ] && shift
fi
[ $(( $# % 2 )) -eq 0 ] || fail "overrides after '--' must come in KEY VALUE pairs"

if [ -z "$config" ]; then
  config=configs/quickstart.yaml
  quickstart=1
else
  quickstart=0
fi
[ -n "$name" ] || name=$(basename "$config" .yaml)
output_dir="output/$name"

if [ "$quickstart" -eq 1 ] && [ "$eval_only" -eq 0 ]; then
  echo "[run_train] preparing the quick-start data from the sample images"
  "$python" tools/prepare_quickstart.py
fi

if [ "$eval_only" -eq 1 ] && [ -z "$weights" ]; then
  if [ -f "$output_dir/model_final.pth" ]; then
    weights="$output_dir/model_final.pth"
  else
    fail "-e needs weights: pass -w FILE (no $output_dir/model_final.pth to fall back on)"
  fi
fi

if [ "$debug" -eq 1 ]; then
  add_override DATALOADER.NUM_WORKERS 1
  add_override TEST.EVAL_PERIOD 20
fi
[ -z "$weights" ] || add_override MODEL.WEIGHTS "$weights"
add_override OUTPUT_DIR "$output_dir"

if [ -z "$num_gpus" ]; then
  if "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    num_gpus=1
  else
    num_gpus=0
    add_override MODEL.DEVICE cpu
  fi
fi

eval_flag=""
[ "$eval_only" -eq 0 ] || eval_flag="--eval-only"

# shellcheck disable=SC2086  # the overrides are KEY VALUE words without spaces by construction
echo "[run_train] $python train_net.py --config-file $config --num-gpus $num_gpus $eval_flag$overrides $*"
# shellcheck disable=SC2086
exec "$python" train_net.py --config-file "$config" --num-gpus "$num_gpus" $eval_flag $overrides "$@"
