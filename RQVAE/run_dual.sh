#!/usr/bin/env bash
# Step 3, option B (recommended): RQ-VAE tokenizer on collaborative (SASRec) + semantic (text) item vectors.
# Each part is L2-normalised per item, then they are concatenated (config key `normalize`, default true).
# Usage: cd RQVAE && bash run_dual.sh [--key value ...]     env: DATASET, DEVICE, EPOCHS, COLLAB_PATH, SEMANTIC_PATH
set -euo pipefail
cd "$(dirname "$0")"
DATASET=${DATASET:-Instrument2018_5090}
DEVICE=${DEVICE:-auto}                 # auto = cuda when present, else cpu
EPOCHS=${EPOCHS:-300}                   # maximum; early stopping on the collision rate
COLLAB_PATH=${COLLAB_PATH:-}           # e.g. ../RecBole/dataset/${DATASET}/${DATASET}_emb_256.npy; empty = config default
SEMANTIC_PATH=${SEMANTIC_PATH:-}       # e.g. ../RecBole/dataset/${DATASET}/${DATASET}_sentence-transformer_text_384.npy;
                                       # empty = the text stage's file in the dataset folder (any dimension)

python main.py --config "../config/${DATASET}.yaml" \
  --tokenizer_input dual \
  ${COLLAB_PATH:+--collab_path "$COLLAB_PATH"} \
  ${SEMANTIC_PATH:+--semantic_path "$SEMANTIC_PATH"} \
  --num_emb_list 256 256 256 \
  --layers 1024 512 256 \
  --e_dim 128 \
  --rq_batch_size 2048 \
  --rq_epochs "$EPOCHS" \
  --device "$DEVICE" \
  --sk_epsilons 0.0 0.0 0.003 \
  --kmeans_iters 100 \
  "$@"
