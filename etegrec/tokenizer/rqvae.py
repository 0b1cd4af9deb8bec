"""RQ-VAE item tokenizer: MLP encoder -> residual quantizer -> MLP decoder, and its checkpoint format.

Encoder dims ``[in_dim] + layers + [e_dim]``, decoder the reverse. Each step is Dropout -> Linear [-> BatchNorm]
-> ReLU, the last Linear plain; Linear weights Xavier-normal, biases 0 (reference ``MLPLayers``).

Checkpoint (``save_rqvae`` / ``load_rqvae``): one ``torch.save`` dict of tensors and plain containers, so
``torch.load(weights_only=True)`` reads it::

    {"format": "etegrec.rqvae/1", "model_args": {in_dim, layers, e_dim, num_emb_list, beta, dropout_prob, bn},
     "state_dict": ..., "item_codes": LongTensor (N, L+1) (suffix included; ``ItemCodes.stored``),
     "metrics": {...}, "input": {"tokenizer_input", "n_items", ...}, "config": flat config dict,
     "producer": "which run wrote it"}

Deviations from the reference code: it saved either a wrapper dict the joint trainer could not read (the original
repository) or a bare state dict without the architecture (its fork), and loaded it with ``strict=False``, so a
wrong file loaded nothing, silently. Here the file carries its architecture and loading is strict: any missing,
unexpected or differently shaped tensor is an ``ArtifactError`` that lists them and names the producer.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from etegrec.artifacts import STEP_RQVAE, ArtifactError, atomic_torch_save
from etegrec.runtime import cpu_state, load_checkpoint_file
from etegrec.tokenizer.item_codes import ItemCodes
from etegrec.tokenizer.quantizer import ResidualQuantizer

CKPT_FORMAT = "etegrec.rqvae/1"


class MLP(nn.Module):
    """Dropout -> Linear [-> BatchNorm1d] -> ReLU per step; the last Linear has no BN or activation."""

    def __init__(self, *, dims: Sequence[int], dropout_prob: float = 0.0, bn: bool = False) -> None:
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"an MLP needs at least input and output sizes, got dims={list(dims)}")
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            mods += [nn.Dropout(p=dropout_prob), nn.Linear(a, b)]
            if i < len(dims) - 2:
                if bn:
                    mods.append(nn.BatchNorm1d(b))
                mods.append(nn.ReLU())
        self.mlp_layers = nn.Sequential(*mods)
        for m in self.mlp_layers:
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp_layers(x)


class RQVAEOutput(NamedTuple):
    """Result of ``RQVAE.forward``."""

    recon: Tensor  # (B, in_dim)
    z: Tensor  # (B, e) encoder output
    quantized: Tensor  # (B, e) straight-through quantised latent
    codes: Tensor  # (B, L) long
    distances: Tensor  # (B, L, K) squared distances per level
    loss_recon: Tensor  # scalar MSE(recon, x)
    loss_rq: Tensor  # scalar residual-quantisation loss


class RQVAE(nn.Module):
    """Item tokenizer: ``x (B, in_dim) -> z (B, e) -> codes (B, L) -> recon (B, in_dim)``.

    Args:
        in_dim: input vector size (256 collab, collab + text dims for dual).
        layers: encoder hidden sizes; the decoder mirrors them.
        e_dim: latent / codebook dimension.
        num_emb_list: codebook size per level.
        beta: commitment weight.
        dropout_prob: MLP dropout.
        bn: batch norm in the MLPs.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        layers: Sequence[int],
        e_dim: int,
        num_emb_list: Sequence[int],
        beta: float = 0.25,
        dropout_prob: float = 0.0,
        bn: bool = False,
    ) -> None:
        super().__init__()
        self._args = {
            "in_dim": int(in_dim),
            "layers": [int(x) for x in layers],
            "e_dim": int(e_dim),
            "num_emb_list": [int(k) for k in num_emb_list],
            "beta": float(beta),
            "dropout_prob": float(dropout_prob),
            "bn": bool(bn),
        }
        dims = [int(in_dim), *self._args["layers"], int(e_dim)]
        self.encoder = MLP(dims=dims, dropout_prob=dropout_prob, bn=bn)
        self.rq = ResidualQuantizer(num_emb_list=num_emb_list, e_dim=e_dim, beta=beta)
        self.decoder = MLP(dims=dims[::-1], dropout_prob=dropout_prob, bn=bn)

    def model_args(self) -> dict[str, Any]:
        """Constructor arguments (``RQVAE(**model.model_args())`` rebuilds the architecture)."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._args.items()}

    def forward(self, x: Tensor, sk_epsilons: Sequence[float] | None = None, sk_iters: int = 50) -> RQVAEOutput:
        """Encode, quantise (Sinkhorn where ``sk_epsilons`` > 0), decode; losses unweighted."""
        z = self.encoder(x)  # (B, e)
        q = self.rq(z, sk_epsilons=sk_epsilons, sk_iters=sk_iters)
        recon = self.decoder(q.quantized)  # (B, in_dim)
        return RQVAEOutput(
            recon=recon, z=z, quantized=q.quantized, codes=q.codes, distances=q.distances,
            loss_recon=F.mse_loss(recon, x), loss_rq=q.loss,
        )

    @torch.no_grad()
    def encode(self, x: Tensor, batch_size: int = 4096) -> Tensor:
        """Encoder outputs for many vectors: (N, in_dim) -> (N, e), in eval mode, batched."""
        was_training = self.training
        self.eval()
        try:
            dev = next(self.parameters()).device
            return torch.cat([self.encoder(x[i : i + batch_size].to(dev)) for i in range(0, len(x), batch_size)])
        finally:
            self.train(was_training)

    @torch.no_grad()
    def get_codes(
        self, x: Tensor, batch_size: int = 4096, sk_epsilons: Sequence[float] | None = None, sk_iters: int = 50
    ) -> Tensor:
        """Code tuples of many vectors: (N, in_dim) -> (N, L) long, eval mode.

        Default: nearest code at every level (what joint training uses). With ``sk_epsilons``, the levels whose
        epsilon is > 0 use Sinkhorn over ALL N vectors at once (balanced over the whole item set).
        """
        was_training = self.training
        self.eval()
        try:
            z = self.encode(x, batch_size)  # (N, e)
            if sk_epsilons is not None and any(e > 0 for e in sk_epsilons):
                return self.rq(z, sk_epsilons=sk_epsilons, sk_iters=sk_iters).codes
            return torch.cat([self.rq(z[i : i + batch_size]).codes for i in range(0, len(z), batch_size)])
        finally:
            self.train(was_training)

    @torch.no_grad()
    def catalogue_distances(self, x: Tensor, batch_size: int = 4096) -> Tensor:
        """Squared distances to every code along the nearest-code path: (N, in_dim) -> (N, L, K), eval mode."""
        z = self.encode(x, batch_size)  # (N, e)
        return torch.cat([self.rq(z[i : i + batch_size]).distances for i in range(0, len(z), batch_size)])

    @torch.no_grad()
    def codes_with_margin(
        self,
        x: Tensor,
        previous: Tensor,
        margins: Tensor,
        sk_epsilons: Sequence[float] | None = None,
        sk_iters: int = 50,
    ) -> Tensor:
        """Code tuples of many vectors that keep previous codes within ``margins``: (N, in_dim) -> (N, L).

        See ``ResidualQuantizer.codes_with_margin``; all N vectors are assigned at once (Sinkhorn balances over
        the whole set, as ``get_codes`` with ``sk_epsilons``).
        """
        return self.rq.codes_with_margin(self.encode(x), previous, margins, sk_epsilons, sk_iters)

    def codes_to_vectors(self, codes: Tensor) -> Tensor:
        """Quantised latents of code tuples: (B, L) -> (B, e)."""
        return self.rq.codes_to_vectors(codes)


# --------------------------------------------------------------------------------------------- checkpoints
def save_rqvae(
    path: Path,
    model: RQVAE,
    item_codes: ItemCodes,
    metrics: dict[str, Any],
    cfg: Any,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a self-describing checkpoint atomically (format in the module docstring).

    Args:
        path: target ``.pth`` file.
        model: the tokenizer.
        item_codes: the item IDs it assigns (L codes + the suffix per item).
        metrics: plain floats/ints (collision rate, gini, losses, epoch...).
        cfg: the run's ``Config`` (stored flat) or an already flat dict.
        extra: more top-level entries, e.g. ``{"input": {...}, "producer": "..."}``.
    """
    obj: dict[str, Any] = {
        "format": CKPT_FORMAT,
        "model_args": model.model_args(),
        "state_dict": cpu_state(model),
        "item_codes": item_codes.stored(),
        "metrics": {k: (float(v) if isinstance(v, float) else v) for k, v in metrics.items()},
        "config": cfg if isinstance(cfg, dict) else cfg.to_dict(),
        "producer": f"etegrec.tokenizer ({time.strftime('%Y-%m-%d %H:%M:%S')})",
    }
    obj.update(extra or {})
    atomic_torch_save(Path(path), obj)


def _describe(obj: dict[str, Any]) -> str:
    cfg = obj.get("config") or {}
    inp = obj.get("input") or {}
    return (
        f"written by {obj.get('producer', 'an unknown producer')} for dataset {cfg.get('dataset', '?')!r}, "
        f"tokenizer_input={inp.get('tokenizer_input', '?')!r}, n_items={inp.get('n_items', '?')}, "
        f"model_args={obj.get('model_args')}"
    )


def load_tokenizer_state(model: RQVAE, state_dict: dict[str, Tensor], source: str) -> None:
    """Load ``state_dict`` into ``model`` strictly; on any mismatch raise ArtifactError listing it.

    Args:
        model: the tokenizer to fill.
        state_dict: tensors by name.
        source: what the tensors come from (file and producer), quoted in the error.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if shapes:
            parts.append(f"shape mismatches [{'; '.join(shapes)}]")
        raise ArtifactError(
            f"RQ-VAE weights from {source} do not fit the tokenizer {model.model_args()}: {', '.join(parts)}. "
            f"Use a checkpoint made for this configuration, or re-create one with {STEP_RQVAE}."
        )
    model.load_state_dict(state_dict, strict=True)


def load_rqvae(
    path: Path | str, map_location: str | torch.device = "cpu", expected_args: dict[str, Any] | None = None
) -> tuple[RQVAE, dict[str, Any]]:
    """Rebuild the tokenizer from a checkpoint file alone, strictly.

    Args:
        path: a ``best_collision_*.pth`` / ``best_gini_*.pth`` file.
        map_location: device for the tensors.
        expected_args: model arguments the caller needs (e.g. ``{"in_dim": 640, "num_emb_list": [256]*3}``);
            any that differ from the file's raise ArtifactError.

    Returns:
        (model in eval mode, the raw checkpoint dict; whoever uses its ``item_codes`` reads them with
        ``ItemCodes.from_file``, which checks them).
    """
    path = Path(path)
    obj = load_checkpoint_file(path, "RQ-VAE checkpoint", STEP_RQVAE, map_location)
    if not isinstance(obj, dict) or obj.get("format") != CKPT_FORMAT:
        kind = "a bare state dict (reference-code format, no architecture)" if isinstance(obj, dict) else type(obj).__name__
        raise ArtifactError(
            f"{path} is {kind}, not an {CKPT_FORMAT} checkpoint with model_args/state_dict/item_codes; "
            f"re-create it with {STEP_RQVAE}."
        )
    args = obj["model_args"]
    if expected_args:
        diff = {k: (args.get(k), v) for k, v in expected_args.items() if args.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: file {a!r} vs needed {b!r}" for k, (a, b) in diff.items())
            raise ArtifactError(
                f"RQ-VAE checkpoint {path} does not match the configuration ({shown}); it was {_describe(obj)}. "
                f"Point rqvae_path at a matching file or re-create one with {STEP_RQVAE}."
            )
    try:
        model = RQVAE(**args)
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{path}: model_args {args} are invalid ({err}); it was {_describe(obj)}.") from None
    load_tokenizer_state(model, obj["state_dict"], f"{path} ({_describe(obj)})")
    model.to(map_location).eval()
    return model, obj
