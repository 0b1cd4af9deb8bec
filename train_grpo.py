"""Step 5 of the README: GRPO fine-tuning of a joint-training checkpoint.

    accelerate launch --config_file accelerate_config_ddp.yaml train_grpo.py \
        --sft_ckpt=myckpt/<DATASET>/<TIMESTAMP>/best.pt --grpo_group_size=2 --grpo_kl_coeff=0.05 \
        --grpo_temperature=1.0 --grpo_reward_alpha=0.5 --grpo_lr=1e-5 --grpo_epochs=20 --grpo_early_stop=5 \
        --grpo_batch_size=32 --gradient_accumulation_steps=4

``--sft_ckpt`` alone rebuilds model, tokenizer and item codes from the config stored in the checkpoint; an
optional ``--config FILE`` and ``--key=value`` overrides may change GRPO and run-time keys only
(``etegrec.grpo.config.MUTABLE_KEYS``: the grpo section, seed, evaluation, logging and data-path keys), never the
architecture. Output: ``myckpt/<DATASET>/<TIMESTAMP>_grpo/``.
``--resume=myckpt/<DATASET>/<TIMESTAMP>_grpo/last.pt`` continues an interrupted run in its folder, with its own
config, exactly as if it had not stopped.
"""

from __future__ import annotations

from etegrec.cli import run_script
from etegrec.config import given_values


def main(argv: list[str]) -> dict:
    """Parse the command line, build the Accelerator, run GRPO; returns the before/after metrics."""
    given_values(argv)  # unknown keys, wrong types and bad YAML fail here, before torch loads
    from etegrec.grpo.config import load_grpo_config
    from etegrec.grpo.trainer import run
    from etegrec.runtime import make_accelerator

    return run(load_grpo_config(argv), make_accelerator())


if __name__ == "__main__":
    run_script(main, __doc__, ("grpo", "train"))
