"""Step 3: the RQ-VAE item tokenizer (quantizer, model, item codes and their trie, pretraining)."""

from etegrec.tokenizer.item_codes import ItemCodes, ItemTrie, add_suffix, build_item_codes, collision_stats
from etegrec.tokenizer.quantizer import QuantizerOutput, ResidualQuantizer, code_log_probs, sinkhorn_codes
from etegrec.tokenizer.rqvae import RQVAE, RQVAEOutput, load_rqvae, load_tokenizer_state, save_rqvae

__all__ = [
    "RQVAE",
    "ItemCodes",
    "ItemTrie",
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
