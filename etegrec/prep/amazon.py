"""Step 1, data preparation: raw interactions -> k-core -> leave-one-out splits, item-id map, statistics.

``run(cfg)`` reads rows ``(user, item, rating, timestamp, line)`` with the reader that ``cfg.data.raw_format``
selects (Amazon 2018 / 2014 / 2023 here; MovieLens-100K, the P5 ``Beauty.txt`` format and the CGR json format
in ``converters.py``), then: optional de-duplication -> iterative k-core -> per-user chronological order ->
item ids -> one record per prefix -> atomic writes of ``<NAME>.inter``, ``<NAME>.{train,valid,test}.jsonl``,
``<NAME>.emb_map.json``, ``<NAME>.item_text.json`` (when metadata is known) and ``dataset_stats.json``.

Deviations from the reference scripts (FORK ``RecBole/prepare_data*.py``), all deliberate:

* Malformed lines are counted and reported with line numbers; past ``max_bad_line_share`` the run stops.
  The reference skips them silently (a Python-literal file then gives an empty frame and a late crash).
* ``dedup`` (default true) drops repeated (user, item) pairs and keeps the earliest; the reference keeps
  them (``--dedup=false`` reproduces it), which is suspected to inflate its metrics.
* Timestamp ties are broken explicitly by the original line index (the reference's stable sort gives the
  same order for one file, but only implicitly).
* Users are ordered by raw id: numerically when every user id is a decimal integer (MovieLens, Beauty,
  Scientific), else by string (Amazon ids; the same order as the reference's ``groupby``).
* Item ids are assigned here (order of first appearance in that user order, each user's items
  chronologically) and written once; the reference inherits them from RecBole's internal factorisation.
* A review without a rating gets 5.0 (the reference does this for its 2023 script only); the rating is not
  used by any later stage.
* Amazon 2014 reviews may also be Python literals (parsed with ``ast.literal_eval``, never ``eval``).
* Metadata text is cleaned: HTML tags removed, entities unescaped, whitespace collapsed, lists joined.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import html
import itertools
import json
import logging
import math
import os
import re
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from etegrec.artifacts import PAD_TOKEN, SPLITS, DatasetFiles, atomic_write_text
from etegrec.config import REPO_ROOT, Config
from etegrec.errors import PrepError

logger = logging.getLogger("etegrec.prep")

MAX_EXAMPLES = 5  # malformed lines quoted in the log and in the error message
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\tsplit:token"
_DIGITS = re.compile(r"[0-9]+")
_TAGS = re.compile(r"<[^>]{0,500}>")
SHARED_DATA = Path(os.environ.get("ETEGREC_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


class BadLine(ValueError):
    """One malformed input line or entry; the message is the reason (readers count it and go on)."""


class Row(NamedTuple):
    """One interaction as read from the raw file."""

    user: str
    item: str
    rating: float
    timestamp: float  # seconds (or the position in the sequence for formats without time)
    line: int  # original line (or entry) index: the tie-breaker for equal timestamps


class ItemText(NamedTuple):
    """Item text for the text-embedding stage; every field a plain string ("" when unknown)."""

    title: str = ""
    brand: str = ""
    categories: str = ""
    description: str = ""


@dataclass
class LineReport:
    """Counts the data lines of one input file and remembers where the malformed ones are."""

    path: Path
    lines: int = 0
    bad: int = 0
    examples: list[str] = field(default_factory=list)

    def add_bad(self, where: int | str, reason: str) -> None:
        """Count one malformed line (``where``: 1-based line number or an entry name)."""
        self.bad += 1
        if len(self.examples) < MAX_EXAMPLES:
            message = f"{self.path}:{where}: {reason}"
            self.examples.append(message)
            logger.warning("malformed input, skipped: %s", message)

    @property
    def share(self) -> float:
        return self.bad / self.lines if self.lines else 0.0

    def check(self, max_share: float, expected: str) -> None:
        """Raise PrepError when the file has no data or too many malformed lines."""
        if self.lines == 0:
            raise PrepError(f"{self.path} contains no data lines; expected {expected}.")
        if not self.bad:
            return
        logger.warning(
            "%s: %d of %d lines malformed (%.3f%%) and skipped", self.path, self.bad, self.lines, 100 * self.share
        )
        if self.share > max_share:
            first = "\n  ".join(self.examples)
            fix = (
                "Most lines are malformed, so the file is probably in another format: check raw_format."
                if self.share > 0.5
                else "Fix the file, or skip these lines by raising the limit, e.g. "
                f"--max_bad_line_share={round(self.share + 0.005, 3)}."
            )
            raise PrepError(
                f"{self.path}: {self.bad} of {self.lines} lines ({self.share:.2%}) are malformed, more than "
                f"max_bad_line_share={max_share:g}. First malformed lines:\n  {first}\nExpected {expected}. {fix}"
            )


# ------------------------------------------------------------------------------------------ reading
def iter_lines(path: Path, report: LineReport) -> Iterator[tuple[int, str]]:
    """Yield ``(1-based line number, text)`` for the non-blank lines of a plain or gzip file.

    Gzip is detected from the file's first bytes, not its name. Lines that are not UTF-8 are reported.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as raw:
        is_gzip = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw
        with tqdm(total=size, unit="B", unit_scale=True, desc=f"reading {path.name}", disable=None, leave=False) as bar:
            line_no = 0
            try:
                for line_no, data in enumerate(stream, 1):
                    if line_no % 20000 == 0:
                        bar.update(raw.tell() - bar.n)
                    if not data.strip():
                        continue
                    report.lines += 1
                    try:
                        text = data.decode("utf-8")
                    except UnicodeDecodeError as err:
                        report.add_bad(line_no, f"not UTF-8 text ({err.reason} at byte {err.start})")
                        continue
                    yield line_no, text.lstrip("\ufeff") if line_no == 1 else text
            except (OSError, EOFError, zlib.error) as err:
                raise PrepError(
                    f"{path}: cannot read past line {line_no} ({type(err).__name__}: {err}); the file is damaged or "
                    "truncated. Download it again."
                ) from None
            bar.update(size - bar.n)


def parse_object(text: str, allow_literal: bool) -> dict[str, Any]:
    """Parse one line as a JSON object (or a Python dict literal when allowed); BadLine says why not."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        if not allow_literal:
            raise BadLine(f"not valid JSON ({err.msg} at column {err.colno})") from None
        try:
            obj = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            raise BadLine(f"neither JSON nor a Python literal ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise BadLine(f"expected an object {{...}}, got {type(obj).__name__}")
    return obj


def get_id(obj: dict[str, Any], key: str) -> str:
    """A non-empty id string from ``obj[key]`` (ints are accepted and converted)."""
    value = obj.get(key)
    if value is None:
        raise BadLine(f"missing field '{key}'")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadLine(f"field '{key}' is a {type(value).__name__}, not an id string")
    return check_id(str(value), key)


def check_id(value: str, what: str) -> str:
    """Strip an id and reject empty ones or ones that would break the TAB-separated ``.inter`` file."""
    value = value.strip()
    if not value:
        raise BadLine(f"{what} is empty")
    if any(c in value for c in "\t\r\n"):
        raise BadLine(f"{what} {value!r} contains a tab or line break")
    return value


def get_number(obj: dict[str, Any], key: str, default: float | None = None) -> float:
    """A finite float from ``obj[key]``; ``default`` when the field is absent (None = required)."""
    value = obj.get(key)
    if value is None:
        if default is None:
            raise BadLine(f"missing field '{key}'")
        return default
    not_a_number = BadLine(f"field '{key}' = {value!r} is not a number")
    if isinstance(value, bool):
        raise not_a_number
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise not_a_number from None
    if not math.isfinite(number):
        raise BadLine(f"field '{key}' = {value!r} is not finite")
    return number


@dataclass(frozen=True)
class ReviewLayout:
    """Field names of one Amazon review dump."""

    user: str
    item: str
    rating: str
    timestamp: str
    time_divisor: float  # timestamp unit -> seconds
    allow_literal: bool  # also accept Python-literal lines


REVIEW_LAYOUTS = {
    "amazon2018": ReviewLayout("reviewerID", "asin", "overall", "unixReviewTime", 1.0, False),
    "amazon2014": ReviewLayout("reviewerID", "asin", "overall", "unixReviewTime", 1.0, True),
    "amazon2023": ReviewLayout("user_id", "parent_asin", "rating", "timestamp", 1000.0, False),
}


def iter_amazon_reviews(path: Path, report: LineReport, fmt: str) -> Iterator[Row]:
    """Rows of an Amazon review file (``fmt`` = amazon2018 | amazon2014 | amazon2023), plain or gzip."""
    lay = REVIEW_LAYOUTS[fmt]
    for line_no, text in iter_lines(path, report):
        try:
            obj = parse_object(text, lay.allow_literal)
            row = Row(
                user=get_id(obj, lay.user),
                item=get_id(obj, lay.item),
                rating=get_number(obj, lay.rating, default=5.0),
                timestamp=get_number(obj, lay.timestamp) / lay.time_divisor,
                line=line_no,
            )
        except BadLine as err:
            report.add_bad(line_no, str(err))
            continue
        yield row


def _strings(value: Any) -> Iterator[str]:
    """Strings inside a value that may be a string, a number or (nested) lists of them."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield str(value)


def clean_text(value: Any, sep: str = " ", unique: bool = False) -> str:
    """One plain string: tags removed, HTML entities unescaped, whitespace collapsed, parts joined by ``sep``."""
    parts: list[str] = []
    for part in _strings(value):
        part = " ".join(html.unescape(_TAGS.sub(" ", part)).split())
        if part and not (unique and part in parts):
            parts.append(part)
    return sep.join(parts)


def amazon_item_text(obj: dict[str, Any], fmt: str) -> tuple[str, ItemText]:
    """``(raw item id, ItemText)`` from one metadata record of the 2018, 2014 or 2023 dump."""
    if fmt == "amazon2023":
        item = get_id(obj, "parent_asin")
        details = obj.get("details") if isinstance(obj.get("details"), dict) else {}
        brand = obj.get("store") or details.get("Brand") or details.get("brand")
        categories = obj.get("categories") or obj.get("main_category")
    else:  # 2018: `category` (list); 2014: `categories` (list of lists)
        item = get_id(obj, "asin")
        brand = obj.get("brand")
        categories = obj.get("categories") or obj.get("category") or obj.get("main_cat")
    return item, ItemText(
        title=clean_text(obj.get("title")),
        brand=clean_text(brand),
        categories=clean_text(categories, sep=", ", unique=True),
        description=clean_text(obj.get("description")),
    )


def read_amazon_meta(path: Path, report: LineReport, keep: set[str], fmt: str) -> dict[str, ItemText]:
    """Item text of the items in ``keep`` from a metadata file (JSON or Python-literal lines; first record wins)."""
    out: dict[str, ItemText] = {}
    for line_no, text in iter_lines(path, report):
        try:
            item, item_text = amazon_item_text(parse_object(text, allow_literal=True), fmt)
        except BadLine as err:
            report.add_bad(line_no, str(err))
            continue
        if item in keep and item not in out:
            out[item] = item_text
    return out


# --------------------------------------------------------------------------------------- formats
@dataclass(frozen=True)
class RawFormat:
    """How to find, read and describe one raw input format."""

    read_rows: Callable[[Path, LineReport], Iterator[Row]]
    read_text: Callable[[Path, LineReport, set[str]], dict[str, ItemText]]
    default_raw: Callable[[Config], Path]  # used when raw_file is empty
    meta_candidates: Callable[[Path], list[Path]]  # metadata files tried beside the raw file when meta_file is empty
    expected: str  # the line layout, quoted in errors
    source: str  # where the file comes from, quoted in "missing file" errors
    locate: Callable[[Path], Path] | None = None  # folder -> data file (sequence formats)


def _amazon_meta_candidates(raw: Path) -> list[Path]:
    """``meta_<Category>.json[l][.gz]`` beside ``[reviews_]<Category>.json[l][.gz]``."""
    name = raw.name.removesuffix(".gz")
    name = "meta_" + name.removeprefix("reviews_").removeprefix("meta_")
    return [raw.parent / name, raw.parent / (name + ".gz")]


def _amazon_format(fmt: str, default_name: str, expected: str, source: str) -> RawFormat:
    return RawFormat(
        read_rows=lambda p, r: iter_amazon_reviews(p, r, fmt),
        read_text=lambda p, r, keep: read_amazon_meta(p, r, keep, fmt),
        default_raw=lambda cfg: cfg.dataset_dir / default_name,
        meta_candidates=_amazon_meta_candidates,
        expected=expected,
        source=source,
    )


AMAZON_FORMATS: dict[str, RawFormat] = {
    "amazon2018": _amazon_format(
        "amazon2018",
        "Musical_Instruments.json",
        'one JSON object per line with "reviewerID", "asin", "overall", "unixReviewTime" (Amazon 2018; files with '
        "single-quoted Python-literal lines are the 2014 layout: --raw_format=amazon2014)",
        "the Amazon Review Data 2018 (Ni et al.), https://nijianmo.github.io/amazon/index.html: download the "
        "category's review file (e.g. Musical_Instruments.json.gz; .gz is read directly) into the dataset folder",
    ),
    "amazon2014": _amazon_format(
        "amazon2014",
        "reviews_Musical_Instruments.json",
        'one object per line (JSON or Python literal) with "reviewerID", "asin", "overall", "unixReviewTime" '
        "(Amazon 2014)",
        "the Amazon 2014 dump (McAuley et al.), https://jmcauley.ucsd.edu/data/amazon/: download "
        "reviews_<Category>.json.gz (or the 5-core file) into the dataset folder",
    ),
    "amazon2023": _amazon_format(
        "amazon2023",
        "Musical_Instruments.jsonl",
        'one JSON object per line with "user_id", "parent_asin", "timestamp" (ms) and optional "rating" (Amazon 2023)',
        "the Amazon Reviews 2023 dump (Hou et al.), https://amazon-reviews-2023.github.io/: download "
        "<Category>.jsonl.gz into the dataset folder",
    ),
}


def raw_formats() -> dict[str, RawFormat]:
    """All supported ``raw_format`` values."""
    from etegrec.prep import converters  # imported here: converters builds on this module's row types

    return {**AMAZON_FORMATS, **converters.FORMATS}


def resolve_input(cfg: Config, value: str) -> Path:
    """A configured input path: absolute as given; a relative one is looked up in the dataset folder, then the
    repository root, then the shared data folder (``$ETEGREC_SHARED_DATA``, default ``<repo>/../shared/data``);
    when it is in none of them, the dataset-folder path is returned (and reported as missing)."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    candidates = [cfg.dataset_dir / p, cfg.path(value), SHARED_DATA / p]
    return next((c for c in candidates if c.exists() or _with_gz(c).exists()), candidates[0])


def _with_gz(path: Path) -> Path:
    """``path`` itself, or ``path.gz`` when only the compressed file is there."""
    gz = path.with_name(path.name + ".gz")
    return gz if not path.exists() and gz.is_file() else path


def find_inputs(cfg: Config, spec: RawFormat) -> tuple[Path, Path | None]:
    """The raw interaction file and the metadata file (None = no item text) for this config."""
    d = cfg.data
    raw = _with_gz(resolve_input(cfg, d.raw_file) if d.raw_file else spec.default_raw(cfg))
    if not raw.exists():
        how = f"--raw_file={d.raw_file}" if d.raw_file else f"the default for raw_format={d.raw_format}"
        raise PrepError(
            f"raw interaction file {raw} does not exist ({how}). It comes from {spec.source}; "
            "or point --raw_file=PATH at it (relative paths are looked up in the dataset folder "
            f"{cfg.dataset_dir}, then the repository root, then {SHARED_DATA})."
        )
    if raw.is_dir():
        if spec.locate is None:
            raise PrepError(f"--raw_file={raw} is a folder; raw_format={d.raw_format} needs the review file itself.")
        raw = spec.locate(raw)
    if d.meta_file:
        meta = _with_gz(resolve_input(cfg, d.meta_file))
        if not meta.is_file():
            raise PrepError(
                f"metadata file {meta} (--meta_file={d.meta_file}) does not exist. It comes from the same source as "
                f"the reviews ({spec.source}, the meta_* file); or set --meta_file= (empty) to skip item text."
            )
        return raw, meta
    meta = next((m for m in spec.meta_candidates(raw) if m.is_file()), None)
    if meta is None:
        logger.info(
            "no metadata file found (tried %s); item text is not written (set --meta_file=PATH to add it)",
            ", ".join(str(m) for m in spec.meta_candidates(raw)) or "none",
        )
    return raw, meta


# ------------------------------------------------------------------------------------ filtering
@dataclass
class Interactions:
    """Interaction columns; ``user``/``item`` are codes into ``user_ids``/``item_ids`` (raw id strings)."""

    user: np.ndarray  # (R,) int64
    item: np.ndarray  # (R,) int64
    rating: np.ndarray  # (R,) float64
    timestamp: np.ndarray  # (R,) float64
    line: np.ndarray  # (R,) int64
    user_ids: list[str]
    item_ids: list[str]

    @classmethod
    def from_rows(cls, rows: Iterable[Row]) -> Interactions:
        users: dict[str, int] = {}
        items: dict[str, int] = {}
        u, i, r, t, ln = [], [], [], [], []
        for row in rows:
            u.append(users.setdefault(row.user, len(users)))
            i.append(items.setdefault(row.item, len(items)))
            r.append(row.rating)
            t.append(row.timestamp)
            ln.append(row.line)
        return cls(
            user=np.asarray(u, dtype=np.int64),
            item=np.asarray(i, dtype=np.int64),
            rating=np.asarray(r, dtype=np.float64),
            timestamp=np.asarray(t, dtype=np.float64),
            line=np.asarray(ln, dtype=np.int64),
            user_ids=list(users),
            item_ids=list(items),
        )

    def __len__(self) -> int:
        return len(self.user)

    def subset(self, mask: np.ndarray) -> Interactions:
        """The rows where ``mask`` is true (id vocabularies are shared, not shrunk)."""
        return Interactions(
            self.user[mask],
            self.item[mask],
            self.rating[mask],
            self.timestamp[mask],
            self.line[mask],
            self.user_ids,
            self.item_ids,
        )

    def counts(self) -> dict[str, int]:
        """``{"users", "items", "interactions"}`` actually present."""
        return {
            "users": int(np.unique(self.user).size),
            "items": int(np.unique(self.item).size),
            "interactions": len(self),
        }

    def pairs(self) -> list[tuple[str, str]]:
        """``(user, item)`` raw-id pairs in row order (for inspection and tests)."""
        return [(self.user_ids[u], self.item_ids[i]) for u, i in zip(self.user.tolist(), self.item.tolist())]


def drop_duplicates(inter: Interactions) -> tuple[Interactions, int]:
    """Keep only the earliest row (by timestamp, then line) of each (user, item) pair; return it and the count removed."""
    order = np.lexsort((inter.line, inter.timestamp, inter.item, inter.user))
    u, i = inter.user[order], inter.item[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    keep = np.zeros(len(inter), dtype=bool)
    keep[order[first]] = True
    return inter.subset(keep), int(len(inter) - keep.sum())


def k_core(inter: Interactions, k: int) -> tuple[Interactions, int]:
    """Iterative k-core: drop users, then items, with fewer than ``k`` rows, until nothing changes.

    Returns the filtered rows and the number of rounds (the last round removes nothing). Raises PrepError
    when nothing is left.
    """
    mask = np.ones(len(inter), dtype=bool)
    rounds = 0
    while True:
        rounds += 1
        before = int(mask.sum())
        user_count = np.bincount(inter.user[mask], minlength=len(inter.user_ids))
        mask &= user_count[inter.user] >= k
        item_count = np.bincount(inter.item[mask], minlength=len(inter.item_ids))
        mask &= item_count[inter.item] >= k
        if int(mask.sum()) == before:
            break
    if not mask.any():
        c = inter.counts()
        raise PrepError(
            f"no interactions are left after the iterative k-core filter with min_interactions={k}: before it "
            f"{c['users']} users / {c['items']} items / {c['interactions']} interactions, after it 0 / 0 / 0 "
            f"({rounds} rounds). Lower --min_interactions (at least 3 for leave-one-out) or use a larger raw file."
        )
    return inter.subset(mask), rounds


# ------------------------------------------------------------------------------- ordering, split
class UserSequence(NamedTuple):
    """One user's interactions in chronological order."""

    user: str
    items: list[str]
    ratings: list[float]
    timestamps: list[float]


class SplitRecord(NamedTuple):
    """One line of a ``.jsonl`` split (raw ids; history oldest first)."""

    user_id: str
    target_id: str
    inter_history: list[str]


def sort_user_ids(ids: Iterable[str]) -> list[str]:
    """Numeric order when every id is a decimal integer (ties by string), else string order."""
    ids = list(ids)
    if all(_DIGITS.fullmatch(u) for u in ids):
        return sorted(ids, key=lambda u: (int(u), u))
    return sorted(ids)


def user_sequences(inter: Interactions) -> list[UserSequence]:
    """Users in ``sort_user_ids`` order, each with its rows sorted by (timestamp, line)."""
    present = np.unique(inter.user)
    code_of = {inter.user_ids[c]: int(c) for c in present}
    rank = np.zeros(len(inter.user_ids), dtype=np.int64)
    for r, name in enumerate(sort_user_ids(code_of)):
        rank[code_of[name]] = r
    order = np.lexsort((inter.line, inter.timestamp, rank[inter.user]))  # last key = primary
    user, item = inter.user[order], inter.item[order]
    rating, ts = inter.rating[order].tolist(), inter.timestamp[order].tolist()
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]).tolist() + [len(order)]
    item_names = [inter.item_ids[i] for i in item.tolist()]
    return [
        UserSequence(inter.user_ids[int(user[a])], item_names[a:b], rating[a:b], ts[a:b])
        for a, b in itertools.pairwise(starts)
    ]


def assign_item_ids(seqs: list[UserSequence]) -> dict[str, int]:
    """``{"[PAD]": 0, raw item id: 1..N}`` in order of first appearance."""
    item_map = {PAD_TOKEN: 0}
    for seq in seqs:
        for item in seq.items:
            item_map.setdefault(item, len(item_map))
    return item_map


def leave_one_out(seqs: list[UserSequence], max_his_len: int) -> dict[str, list[SplitRecord]]:
    """Last item = test, second-last = valid, one train record per prefix ``t = 1 .. n-3``; histories keep their last ``max_his_len`` items."""
    out: dict[str, list[SplitRecord]] = {s: [] for s in SPLITS}
    for seq in seqs:
        items, n = seq.items, len(seq.items)
        if n < 3:
            raise PrepError(
                f"user {seq.user} has {n} interactions; leave-one-out needs at least 3 (min_interactions >= 3)"
            )
        for t in range(1, n - 2):
            out["train"].append(SplitRecord(seq.user, items[t], items[max(0, t - max_his_len) : t]))
        out["valid"].append(SplitRecord(seq.user, items[n - 2], items[max(0, n - 2 - max_his_len) : n - 2]))
        out["test"].append(SplitRecord(seq.user, items[n - 1], items[max(0, n - 1 - max_his_len) : n - 1]))
    return out


# -------------------------------------------------------------------------------------- writing
def render_inter(seqs: list[UserSequence]) -> str:
    """The RecBole atomic file with a split column, rows by user then time."""
    lines = [INTER_HEADER]
    for seq in seqs:
        n = len(seq.items)
        for pos, (item, rating, ts) in enumerate(zip(seq.items, seq.ratings, seq.timestamps)):
            split = "test" if pos == n - 1 else "valid" if pos == n - 2 else "train"
            lines.append(f"{seq.user}\t{item}\t{float(rating)!r}\t{float(ts)!r}\t{split}")
    return "\n".join(lines) + "\n"


def render_split(records: list[SplitRecord]) -> str:
    """JSON lines ``{"user_id", "target_id", "inter_history"}`` (the reference layout).

    Byte-identical to ``json.dumps(record._asdict(), ensure_ascii=False)`` per line, but each id is encoded
    once (a 3x speed-up on Beauty).
    """
    encoded: dict[str, str] = {}

    def enc(s: str) -> str:
        out = encoded.get(s)
        if out is None:
            out = encoded[s] = json.dumps(s, ensure_ascii=False)
        return out

    return "".join(
        f'{{"user_id": {enc(r.user_id)}, "target_id": {enc(r.target_id)}, '
        f'"inter_history": [{", ".join(map(enc, r.inter_history))}]}}\n'
        for r in records
    )


def render_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _warn_if_downstream_stale(files: DatasetFiles, new_map: str) -> None:
    """Warn when the item map changes while vectors or checkpoints made from the old one are present."""
    if not files.item_map.is_file() or files.item_map.read_text(encoding="utf-8") == new_map:
        return
    stale = sorted(p.name for p in files.dir.glob(f"{files.name}_*.npy")) + (
        [files.sasrec_metrics.name] if files.sasrec_metrics.is_file() else []
    )
    if stale:
        logger.warning(
            "the item-id map changed; %s were made with the old one: re-run steps 2-4 (SASRec, text, RQ-VAE, joint)",
            ", ".join(stale),
        )


def run(cfg: Config) -> dict[str, Any]:
    """Prepare ``cfg.dataset_dir`` from the raw input; return (and write) the dataset statistics."""
    start = time.perf_counter()
    d = cfg.data
    formats = raw_formats()
    if d.raw_format not in formats:
        raise PrepError(f"raw_format={d.raw_format!r} is not supported; use one of: {', '.join(formats)}")
    spec = formats[d.raw_format]
    raw_path, meta_path = find_inputs(cfg, spec)
    logger.info("step 1: %s (%s) -> %s", raw_path, d.raw_format, cfg.dataset_dir)

    report = LineReport(raw_path)
    inter = Interactions.from_rows(spec.read_rows(raw_path, report))
    report.check(d.max_bad_line_share, spec.expected)
    raw_counts = inter.counts()
    deduped, removed = drop_duplicates(inter)
    if d.dedup:
        inter = deduped
    after_dedup = inter.counts()
    inter, rounds = k_core(inter, d.min_interactions)
    kept = inter.counts()
    logger.info(
        "%d users / %d items / %d interactions read; %d duplicate (user, item) rows %s; after %d-core (%d rounds): "
        "%d / %d / %d",
        raw_counts["users"],
        raw_counts["items"],
        raw_counts["interactions"],
        removed,
        "removed" if d.dedup else "kept (dedup=false)",
        d.min_interactions,
        rounds,
        kept["users"],
        kept["items"],
        kept["interactions"],
    )
    seqs = user_sequences(inter)
    item_map = assign_item_ids(seqs)
    records = leave_one_out(seqs, d.max_his_len)

    item_text: dict[str, ItemText] | None = None
    text_stats: dict[str, Any] | None = None
    if meta_path is not None:
        meta_report = LineReport(meta_path)
        found = spec.read_text(meta_path, meta_report, set(item_map) - {PAD_TOKEN})
        meta_report.check(d.max_bad_line_share, "one metadata record per line")
        item_text = {item: found.get(item, ItemText()) for item in list(item_map)[1:]}
        if len(found) < len(item_text):
            logger.warning(
                "%d of %d items have no metadata record; their text is empty",
                len(item_text) - len(found),
                len(item_text),
            )
        text_stats = {
            "file": str(meta_path),
            "lines": meta_report.lines,
            "bad_lines": meta_report.bad,
            "items_with_metadata": len(found),
        }

    files = DatasetFiles.from_config(cfg)
    outputs = {files.split(s): render_split(records[s]) for s in SPLITS}
    outputs[files.inter] = render_inter(seqs)
    outputs[files.item_map] = render_json(item_map)
    if item_text is not None:
        outputs[files.item_text] = render_json({k: v._asdict() for k, v in item_text.items()})
    elif files.item_text.is_file():
        logger.warning(
            "%s is from an earlier run (no metadata this time); it is keyed by raw id and left as is", files.item_text
        )
    _warn_if_downstream_stale(files, outputs[files.item_map])

    lengths = np.asarray([len(s.items) for s in seqs])
    stats: dict[str, Any] = {
        "dataset": d.dataset,
        "raw_format": d.raw_format,
        "num_users": kept["users"],
        "num_items": kept["items"],
        "num_interactions": kept["interactions"],
        **{f"{s}_records": len(records[s]) for s in SPLITS},
        "train_interactions": int((lengths - 2).sum()),
        "valid_interactions": len(seqs),
        "test_interactions": len(seqs),
        "seq_len": {"min": int(lengths.min()), "max": int(lengths.max()), "mean": round(float(lengths.mean()), 4)},
        "raw": {"file": str(raw_path), "lines": report.lines, "bad_lines": report.bad, **raw_counts},
        "duplicates": {"rows": removed, "removed": d.dedup},
        "after_dedup": after_dedup,
        "kcore_rounds": rounds,
        "item_text": text_stats,
        "settings": {
            "min_interactions": d.min_interactions,
            "max_his_len": d.max_his_len,
            "dedup": d.dedup,
            "max_bad_line_share": d.max_bad_line_share,
            "user_order": "numeric" if all(_DIGITS.fullmatch(s.user) for s in seqs) else "string",
            "tie_break": "timestamp, then original line index",
        },
        "sha256": {p.name: hashlib.sha256(text.encode("utf-8")).hexdigest() for p, text in outputs.items()},
    }
    files.stats.unlink(missing_ok=True)  # written last, so its presence marks a complete run
    for path, text in outputs.items():
        atomic_write_text(path, text)
    atomic_write_text(files.stats, render_json(stats))
    logger.info(
        "wrote %s (%d users, %d items, %d/%d/%d train/valid/test records) in %.1f s",
        cfg.dataset_dir,
        kept["users"],
        kept["items"],
        *(len(records[s]) for s in SPLITS),
        time.perf_counter() - start,
    )
    return stats
