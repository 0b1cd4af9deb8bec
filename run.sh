#!/usr/bin/env bash
# Step 4: joint training (tokenizer + recommender), then test against the popularity baseline.
# With no arguments it runs the whole pipeline on MovieLens-100K (building missing earlier artifacts).
#   bash run.sh                                   # ml-100k, as configured in config/ml-100k.yaml
#   DATASET=beauty bash run.sh --epochs=40        # another dataset; extra --key=value overrides win
#   bash run.sh --resume=myckpt/ml-100k/<TIMESTAMP>/last.pt
# Processes / GPUs: edit accelerate_config_ddp.yaml (num_processes, gpu_ids); works on CPU too.
set -euo pipefail
cd "$(dirname "$0")"

# Resuming: the run's last.pt holds its config, so no config file or overrides are passed
for arg in "$@"; do
    case "${arg}" in
        --resume=*|--resume|--train.resume=*|--train.resume)
            exec accelerate launch --config_file accelerate_config_ddp.yaml main.py "$@" ;;
    esac
done

DATASET=${DATASET:-ml-100k}

# Hyper-parameters as in the user's README; edit here or override on the command line (later flags win).
# Leave a line empty to keep the config file's value.
OVERRIDES=(
  # --lr_rec=0.005
  # --lr_id=0.0001
  # --cycle=2
  # --eval_step=2
  # --rec_kl_loss=0.0001
  # --rec_dec_cl_loss=0.0003
  # --id_kl_loss=0.0001
  # --id_dec_cl_loss=0.0003
)

accelerate launch --config_file accelerate_config_ddp.yaml main.py \
  --config "config/${DATASET}.yaml" "${OVERRIDES[@]}" "$@"
