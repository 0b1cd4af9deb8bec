"""Step 2.1: collaborative item vectors from RecBole's own SASRec, aligned to the project's item ids.

What ``run`` does:

1. Reads the prepared item map and splits (``<NAME>.emb_map.json``, ``<NAME>.{train,valid,test}.jsonl``) and
   rebuilds each user's full chronological sequence from them (first training history + training targets +
   valid target + test target; every record is checked against it). ``<NAME>.inter`` is not needed, so users of
   the reference's pre-built files (splits + map only) can run this step too.
2. Writes RecBole's input ``<D>/<NAME>_recbole/<NAME>_recbole.inter`` with tokens = **project item ids** (as
   decimal strings), users = their index in the valid split, timestamp = position in the sequence. RecBole
   re-derives the leave-one-out split itself (``LS: valid_and_test``, order ``TO``, group by user, full
   ranking); ``check_recbole_split`` then compares every RecBole train/valid/test record with the jsonl records
   and stops on any difference.
3. Trains ``recbole.model.sequential_recommender.SASRec`` with RecBole's ``Trainer`` (full-softmax CE, early
   stopping on valid NDCG@10), reloads the best-validation checkpoint RecBole wrote, and evaluates valid and
   test with full ranking over all items. Histories are not masked from the ranking (RecBole's behaviour for
   sequential models), the same protocol as the generative model's beam search.
4. Exports ``item_embedding.weight`` (SASRec's input table, also its CE output projection) translated from
   RecBole's internal ids to project ids: row ``j`` of ``<NAME>_emb_<dim>.npy`` is item id ``j+1``; RecBole's
   padding row 0 is dropped, so the file has ``N`` rows. The metrics go to ``<NAME>.sasrec_metrics.json``:
   ``valid``/``test`` (``recall@K``, ``ndcg@K`` for K = 1, 5, 10, 20), ``best_epoch`` (0-based, RecBole's
   numbering), ``epochs_trained``, the valid NDCG@10 curve, device, times and hyper-parameters.

RecBole writes its checkpoint to ``<D>/<NAME>_recbole/saved/SASRec-<TIME>-<PID>.pth`` (weights only, one file
per run), its log to ``<D>/<NAME>_recbole/log/`` and TensorBoard files to ``<D>/<NAME>_recbole/log_tensorboard/``
(never into the working directory).

Deviations from the reference ``RecBole/get_collab_emb.py``: it reads ``<NAME>.inter`` and trusts that
RecBole's factorisation order equals the map it writes; here the map is the preparation stage's and is never
rewritten, the translation internal id -> project id is explicit, and the split is verified record by record.
``inner_size`` equals ``hidden_size`` (as in the reference); other SASRec settings are RecBole defaults. The
reference writes ``<NAME>_collab_emb_<dim>.npy``; this writes the name every later stage reads,
``<NAME>_emb_<dim>.npy``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from etegrec.artifacts import (
    PAD_TOKEN,
    SPLITS,
    STEP_PREPARE,
    ArtifactError,
    DatasetFiles,
    SplitData,
    atomic_save_npy,
    atomic_write_json,
    atomic_write_text,
    load_item_map,
    load_splits,
)
from etegrec.config import Config
from etegrec.runtime import pick_device, setup_logging, timestamp

logger = logging.getLogger("etegrec.embeddings.sasrec")

METRIC_TOPK = (1, 5, 10, 20)
VALID_METRIC = "NDCG@10"


@dataclass
class UserSequences:
    """Each user's full chronological item-id sequence, rebuilt from the prepared splits."""

    users: list[str]  # raw user ids, in the order of the valid split
    sequences: list[np.ndarray]  # int64 item ids, oldest first; the last two are the valid and test targets


def user_sequences(splits: dict[str, SplitData], files: DatasetFiles) -> UserSequences:
    """Rebuild full sequences from the splits and check every record against them.

    A user's sequence is the history of their first training record, then their training targets in file
    order, then the valid and the test target (users without training records: valid history + the two
    targets). Every record must then equal ``(sequence[:p][-len(history):], sequence[p])`` for its position
    ``p``, with histories cut to the longest history in the files.
    """
    train, valid, test = (splits[s] for s in SPLITS)
    step = STEP_PREPARE.replace("NAME", files.name)
    if len(set(valid.users)) != len(valid.users) or sorted(valid.users) != sorted(test.users) or "" in valid.users:
        raise ArtifactError(
            f"{files.split('valid')} and {files.split('test')} must hold exactly one record per user, with the same "
            f"non-empty user_id values; re-create them with {step}."
        )
    test_row = {u: i for i, u in enumerate(test.users)}
    train_rows: dict[str, list[int]] = defaultdict(list)
    for i, u in enumerate(train.users):
        train_rows[u].append(i)
    unknown = set(train_rows) - set(test_row)
    if unknown:
        raise ArtifactError(
            f"{files.split('train')} has users without valid/test records (e.g. {sorted(unknown)[:3]}); "
            f"re-create the splits with {step}."
        )
    max_len = max(len(h) for s in (train, valid, test) for h in s.history)
    sequences = []
    for v, user in enumerate(valid.users):
        t, rows = test_row[user], train_rows.get(user, [])
        head = train.history[rows[0]] if rows else valid.history[v]
        seq = np.concatenate([head, train.target[rows], [valid.target[v], test.target[t]]]).astype(np.int64)
        records = [(train, r, len(head) + k) for k, r in enumerate(rows)]
        records += [(valid, v, len(seq) - 2), (test, t, len(seq) - 1)]
        for split, r, pos in records:
            expected = seq[max(0, pos - max_len) : pos]
            if split.target[r] != seq[pos] or not np.array_equal(split.history[r], expected):
                name = next(s for s in SPLITS if splits[s] is split)
                raise ArtifactError(
                    f"{files.split(name)}: the record of user {user!r} with target item id {split.target[r]} does "
                    "not continue that user's sequence (each split record must be the user's chronological "
                    f"history before its target, cut to the last {max_len} items). Re-create the splits with {step}."
                )
        sequences.append(seq)
    return UserSequences(users=list(valid.users), sequences=sequences)


def write_recbole_inter(path: Path, sequences: Sequence[np.ndarray]) -> None:
    """RecBole atomic file: user token = sequence index, item token = project item id, timestamp = position."""
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u, seq in enumerate(sequences):
        lines.extend(f"{u}\t{item}\t{pos}" for pos, item in enumerate(seq.tolist()))
    atomic_write_text(path, "\n".join(lines) + "\n")


def project_rows(id2token: Sequence[str], n_items: int) -> np.ndarray:
    """RecBole internal item id of every project item id: ``rows[j]`` belongs to item ``j + 1``.

    ``id2token`` is RecBole's ``dataset.field2id_token['item_id']`` (internal id -> token, ``[PAD]`` at 0);
    the tokens are project item ids written by ``write_recbole_inter``. Example: ``['[PAD]', '3', '1', '2']``
    gives ``[2, 3, 1]`` (item 1 is RecBole's id 2, item 2 its id 3, item 3 its id 1), so
    ``weight[project_rows(...)]`` orders RecBole's table by project id.
    """
    tokens = [str(t) for t in id2token]
    if tokens[0] != PAD_TOKEN or sorted(tokens[1:], key=lambda t: (len(t), t)) != [
        str(i) for i in range(1, n_items + 1)
    ]:
        raise ArtifactError(
            f"RecBole's item vocabulary ({len(tokens) - 1} tokens) is not the project's items 1..{n_items}; every "
            "item of the item map must occur in the splits. Re-create the dataset with step 1."
        )
    rows = np.empty(n_items, dtype=np.int64)
    for internal, token in enumerate(tokens[1:], start=1):
        rows[int(token) - 1] = internal
    return rows


def check_recbole_split(datasets: Sequence[Any], splits: dict[str, SplitData], users: Sequence[str]) -> None:
    """Compare RecBole's augmented train/valid/test records with the prepared jsonl records, one by one.

    ``datasets`` are RecBole's built train/valid/test datasets; their user tokens index ``users`` and their item
    tokens are project ids. Records are compared per user in chronological order (the jsonl file order).
    """
    for name, ds in zip(SPLITS, datasets):
        item_tok = np.asarray([int(t) if t != PAD_TOKEN else 0 for t in ds.field2id_token["item_id"]])
        user_tok = ds.field2id_token["user_id"]
        feat = ds.inter_feat
        uid = [users[int(user_tok[u])] for u in feat["user_id"].numpy()]
        target = item_tok[feat["item_id"].numpy()]
        hist = item_tok[feat["item_id_list"].numpy()]  # (R, max_len) padded with 0 on the right
        length = feat["item_length"].numpy()
        order = np.argsort(feat["timestamp"].numpy(), kind="stable")
        ours: dict[str, list[int]] = defaultdict(list)
        for i, u in enumerate(splits[name].users):
            ours[u].append(i)
        theirs: dict[str, list[int]] = defaultdict(list)
        for i in order:
            theirs[uid[i]].append(int(i))
        mine = splits[name]
        same = ours.keys() == theirs.keys() and all(
            len(ours[u]) == len(theirs[u])
            and all(
                mine.target[a] == target[b] and np.array_equal(mine.history[a], hist[b, : length[b]])
                for a, b in zip(ours[u], theirs[u])
            )
            for u in ours
        )
        if not same:
            raise ArtifactError(
                f"RecBole's {name} split differs from the prepared {name} split. Check that max_his_len matches the "
                "history length the splits were made with, or re-create the splits with step 1."
            )


class _StripAnsi(logging.Filter):
    """RecBole colours its log messages; keep the log file plain text."""

    _pattern = re.compile(r"\x1b\[[0-9;]*m")

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._pattern.sub("", str(record.msg))
        return True


@contextlib.contextmanager
def _recbole_logging(log_file: Path) -> Iterator[None]:
    """Send RecBole's messages (root logger) to ``log_file`` and, if nothing else prints them, to stdout."""
    root = logging.getLogger()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(log_file, encoding="utf-8")]
    if not root.handlers:
        handlers.append(logging.StreamHandler(sys.stdout))
    for h in handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s recbole: %(message)s", datefmt="%H:%M:%S"))
        h.addFilter(_StripAnsi())
        root.addHandler(h)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.setLevel(level)
        for h in handlers:
            root.removeHandler(h)
            h.close()


def recbole_config_dict(cfg: Config, recbole_root: Path, checkpoint_dir: Path, show_progress: bool) -> dict[str, Any]:
    """RecBole settings: the reference's SASRec hyper-parameters taken from ``cfg.sasrec``."""
    s = cfg.sasrec
    return {
        "data_path": str(recbole_root),
        "checkpoint_dir": str(checkpoint_dir),
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "MAX_ITEM_LIST_LENGTH": cfg.data.max_his_len,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "hidden_size": s.sasrec_hidden_size,
        "inner_size": s.sasrec_hidden_size,
        "n_layers": s.sasrec_layers,
        "n_heads": s.sasrec_heads,
        "hidden_dropout_prob": s.sasrec_dropout,
        "attn_dropout_prob": s.sasrec_dropout,
        "hidden_act": "gelu",
        "loss_type": "CE",
        "train_neg_sample_args": None,
        "epochs": s.sasrec_epochs,
        "train_batch_size": s.sasrec_batch_size,
        "eval_batch_size": s.sasrec_batch_size,
        "learner": "adam",
        "learning_rate": s.sasrec_lr,
        "eval_step": 1,
        "stopping_step": s.sasrec_stopping_step,
        "valid_metric": VALID_METRIC,
        "metrics": ["Recall", "NDCG"],
        "topk": list(METRIC_TOPK),
        "metric_decimal_place": 6,
        "seed": s.sasrec_seed,
        "reproducibility": True,
        "show_progress": show_progress,
        "log_wandb": False,
        "save_dataset": False,
        "save_dataloaders": False,
    }


class _Trained(NamedTuple):
    """What training SASRec with RecBole yields."""

    embedding: np.ndarray  # (N, d) float32, row j = project item id j+1
    valid: dict[str, float]
    test: dict[str, float]
    best_epoch: int
    valid_curve: list[float]  # valid NDCG@10 per epoch
    train_seconds: float


def _train_recbole(
    cfg: Config,
    files: DatasetFiles,
    splits: dict[str, SplitData],
    seqs: UserSequences,
    n_items: int,
    log_file: Path,
    stamp: str,
    device: Any,
) -> _Trained:
    """Train SASRec with RecBole's ``Trainer`` on RecBole's copy of the split (checked against the prepared one),
    reload the best-validation checkpoint, evaluate it and export its item table in project item-id order."""
    from etegrec.embeddings import recbole_compat as rb  # imports RecBole (slow); only when training

    recbole_name = f"{files.name}_recbole"
    recbole_dir = files.dir / recbole_name
    show_progress = sys.stderr.isatty()
    config = rb.make_config(
        model="SASRec",
        dataset=recbole_name,
        config_dict=recbole_config_dict(cfg, files.dir, recbole_dir / "saved", show_progress),
        device=device,
    )
    with _recbole_logging(log_file), rb.tensorboard_dir(recbole_dir / "log_tensorboard" / f"SASRec-{stamp}"):
        rb.init_seed(config["seed"], config["reproducibility"])
        dataset = rb.create_dataset(config)
        train_data, valid_data, test_data = rb.data_preparation(config, dataset)
        check_recbole_split([d._dataset for d in (train_data, valid_data, test_data)], splits, seqs.users)
        rows = project_rows(dataset.field2id_token["item_id"], n_items)
        logger.info("RecBole's split equals the prepared splits; training SASRec on %s", device)

        rb.init_seed(config["seed"], config["reproducibility"])
        model = rb.SASRec(config, train_data._dataset).to(device)
        trainer = rb.CheckpointTrainer(config, model, recbole_dir / "saved" / f"SASRec-{stamp}-{os.getpid()}.pth")
        valid_curve: list[float] = []
        train_start = time.perf_counter()
        trainer.fit(
            train_data,
            valid_data,
            saved=True,
            show_progress=show_progress,
            callback_fn=lambda epoch, score: valid_curve.append(float(score)),
        )
        train_seconds = time.perf_counter() - train_start
        best_epoch = rb.load_best_checkpoint(trainer)
        valid = trainer.evaluate(valid_data, load_best_model=False, show_progress=show_progress)
        test = trainer.evaluate(test_data, load_best_model=False, show_progress=show_progress)
        trainer.tensorboard.close()

    weight = model.item_embedding.weight.detach().cpu().numpy()  # (N+1, d), RecBole's internal order, 0 = pad
    return _Trained(
        embedding=np.ascontiguousarray(weight[rows], dtype=np.float32),  # (N, d), row j = project item id j+1
        valid={k: float(v) for k, v in valid.items()},
        test={k: float(v) for k, v in test.items()},
        best_epoch=best_epoch,
        valid_curve=valid_curve,
        train_seconds=train_seconds,
    )


def run(cfg: Config) -> dict[str, Any]:
    """Train SASRec, write ``<NAME>_emb_<dim>.npy`` and ``<NAME>.sasrec_metrics.json``; return the metrics."""
    s = cfg.sasrec
    start = time.perf_counter()
    files = DatasetFiles.from_config(cfg)
    name = files.name
    recbole_name = f"{name}_recbole"
    recbole_dir = files.dir / recbole_name
    item_map = load_item_map(files)
    n_items = len(item_map) - 1
    splits = load_splits(files, item_map)
    seqs = user_sequences(splits, files)
    stamp = timestamp()
    log_file = recbole_dir / "log" / f"SASRec-{stamp}.log"
    setup_logging(log_file)
    write_recbole_inter(recbole_dir / f"{recbole_name}.inter", seqs.sequences)
    logger.info("%s: %d users, %d items; RecBole input %s", name, len(seqs.users), n_items, recbole_dir)

    device = pick_device(s.sasrec_device, "sasrec_device")
    trained = _train_recbole(cfg, files, splits, seqs, n_items, log_file, stamp, device)
    emb = trained.embedding
    emb_path = files.collab_emb(s.sasrec_hidden_size)
    atomic_save_npy(emb_path, emb)
    metrics = {
        "model": "SASRec (RecBole 1.2.1)",
        "protocol": "leave-one-out; full ranking over all items; history items not masked",
        "valid": trained.valid,
        "test": trained.test,
        "best_epoch": trained.best_epoch,
        "epochs_trained": len(trained.valid_curve),
        "valid_ndcg@10_curve": trained.valid_curve,
        "n_users": len(seqs.users),
        "n_items": n_items,
        "device": str(device),
        "train_seconds": round(trained.train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "embedding_file": emb_path.name,
        "hyperparameters": {
            **{k: v for k, v in vars(s).items() if k != "sasrec_device"},
            "max_his_len": cfg.data.max_his_len,
        },
    }
    atomic_write_json(files.sasrec_metrics, metrics)
    logger.info(
        "SASRec best epoch %d of %d; test %s; %s (%s) written in %.1f s",
        trained.best_epoch,
        len(trained.valid_curve),
        json.dumps(metrics["test"]),
        emb_path.name,
        emb.shape,
        metrics["wall_seconds"],
    )
    return metrics
