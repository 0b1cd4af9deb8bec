"""Step 3: the RQ-VAE item tokenizer (quantizer, model, item-code tables, pretraining)."""

from etegrec.tokenizer.item_codes import add_suffix, build_item_codes, collision_stats
from etegrec.tokenizer.quantizer import QuantizerOutput, ResidualQuantizer, code_log_probs, sinkhorn_codes
from etegrec.tokenizer.rqvae import RQVAE, RQVAEOutput, load_rqvae, load_tokenizer_state, save_rqvae

__all__ = [
    "RQVAE",
    "QuantizerOutput",
    "RQVAEOutput",
    "ResidualQuantizer",
    "add_suffix",
    "build_item_codes",
    "code_log_probs",
    "collision_stats",
    "load_rqvae",
    "load_tokenizer_state",
    "save_rqvae",
    "sinkhorn_codes",
]
