"""ETEGRec: generative recommendation with an end-to-end learnable item tokenizer (SIGIR'25).

Stages (each a thin script over one module of this package):
1. ``etegrec.prep``        raw reviews -> k-core -> leave-one-out splits + item-id map
2. ``etegrec.embeddings``  SASRec (RecBole) collaborative vectors, sentence-transformer text vectors
3. ``etegrec.tokenizer``   RQ-VAE item tokenizer -> semantic IDs
4. ``etegrec.rec``         joint tokenizer + T5 training with alternating optimisation, beam-search evaluation
5. ``etegrec.grpo``        GRPO fine-tuning of the trained recommender
"""

__version__ = "0.1.0"
