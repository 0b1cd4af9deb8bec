#!/usr/bin/env bash
# Step 5 of the README: GRPO fine-tuning of a joint-training (SFT) checkpoint.
#   bash run_grpo.sh                                  # newest myckpt/$DATASET/*/best.pt
#   DATASET=beauty SFT_CKPT=myckpt/beauty/<run>/best.pt bash run_grpo.sh --grpo_epochs=5
#   bash run_grpo.sh --resume=myckpt/beauty/<run>_grpo/last.pt   # continue an interrupted run, its own settings
# Extra arguments are passed on as overrides; output goes to myckpt/<DATASET>/<TIMESTAMP>_grpo/.
set -euo pipefail
cd "$(dirname "$0")"

# Resuming: the run's last.pt holds its config, so no SFT checkpoint or hyperparameters are passed
for arg in "$@"; do
    case "${arg}" in
        --resume=*|--resume|--train.resume=*|--train.resume)
            echo "Resuming GRPO: $*"
            exec accelerate launch --config_file accelerate_config_ddp.yaml train_grpo.py "$@" ;;
    esac
done

DATASET=${DATASET:-ml-100k}     # the dataset of `bash run.sh` (e.g. beauty, Instrument2018_5090)

# Specify the SFT checkpoint from Step 4 (default: the newest joint-training best.pt of the dataset)
if [ -z "${SFT_CKPT:-}" ]; then
    SFT_CKPT=$(ls -t myckpt/"${DATASET}"/*/best.pt 2>/dev/null | grep -v '_grpo/best.pt$' | head -n 1 || true)
fi
if [ -z "${SFT_CKPT}" ] || [ ! -f "${SFT_CKPT}" ]; then
    echo "run_grpo.sh: no checkpoint '${SFT_CKPT}' (looked for myckpt/${DATASET}/*/best.pt)." >&2
    echo "Train one first with step 4 (bash run.sh), or set SFT_CKPT=path/to/best.pt" >&2
    exit 1
fi
echo "GRPO from ${SFT_CKPT}"

# GRPO hyperparameters
GRPO_ARGS=(
    --grpo_group_size=2            # Number of samples per group
    --grpo_kl_coeff=0.05           # KL divergence coefficient
    --grpo_temperature=1.0         # Sampling temperature
    --grpo_reward_alpha=0.5        # Reward weighting (hit + alpha * shared code prefix)
    --grpo_lr=1e-5                 # Learning rate
    --grpo_epochs=20               # Max epochs
    --grpo_early_stop=5            # Early stopping patience
    --grpo_batch_size=32           # Histories per batch per process
    --gradient_accumulation_steps=4
)

accelerate launch --config_file accelerate_config_ddp.yaml train_grpo.py \
    --sft_ckpt="${SFT_CKPT}" "${GRPO_ARGS[@]}" "$@"
