"""Readers for the non-Amazon-dump datasets, yielding the same rows and item text as ``amazon.py``.

* ``ml-100k``: a RecBole atomic ``.inter`` file (default: the MovieLens-100K copy shipped inside the installed
  ``recbole`` package, ``recbole/dataset_example/ml-100k``) with item text from the ``.item`` file beside it
  (title = ``movie_title (release_year)``, categories = the genres).
* ``beauty_p5``: ``Beauty.txt`` (S3-Rec / P5 / TIGER): one line ``user item_1 ... item_n`` per user, 1-based
  ids, chronological. There are no timestamps: the position in the line is the timestamp. Item text from
  ``Beauty.item_attributes.json`` (``{"id": {"asin", "attributes": [brand?, category, ...]}}``).
* ``cgr_json``: ``<X>.inter.json`` ``{user: [items]}`` (chronological, CollisionGenRec / LETTER layout) with
  ``<X>.item.json`` ``{item: {title, description, brand, categories}}``. Position = timestamp.

Raw ids stay the files' own ids (as strings), so item text, the CGR index file (same ids), LETTER's Beauty
index (keys = Beauty id - 1) and our item map can be joined on them. Deviation: Beauty's attribute list has no brand marker; the first attribute is taken as
the brand exactly when that name never occurs at a later position of any item's list (category names do).
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from etegrec.config import Config
from etegrec.prep.reading import (
    BadLine,
    ItemText,
    LineReport,
    PrepError,
    RawFormat,
    Row,
    check_id,
    clean_text,
    get_number,
    iter_lines,
)


# ------------------------------------------------------------------------------------- MovieLens
def ml100k_dir() -> Path:
    """The MovieLens-100K folder inside the installed recbole package."""
    try:
        root = importlib.resources.files("recbole")
    except ModuleNotFoundError:
        raise PrepError(
            "raw_format=ml-100k reads the copy inside the recbole package: pip install recbole==1.2.1"
        ) from None
    return Path(str(root)) / "dataset_example" / "ml-100k"


def _atomic_header(text: str, path: Path, required: tuple[str, ...]) -> dict[str, int]:
    """Column index by field name from a RecBole header such as ``user_id:token\\titem_id:token``."""
    names = [col.split(":", 1)[0].strip() for col in text.rstrip("\r\n").split("\t")]
    missing = [r for r in required if r not in names]
    if missing:
        raise PrepError(
            f"{path}:1: header {text.strip()!r} lacks the column(s) {', '.join(missing)}; expected a RecBole atomic "
            f"file whose TAB-separated header names {', '.join(required)}."
        )
    return {name: i for i, name in enumerate(names)}


def _atomic_records(path: Path, report: LineReport, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, {column: value})`` for the data lines of a RecBole atomic file; short lines are reported."""
    columns: dict[str, int] | None = None
    for line_no, text in iter_lines(path, report):
        if columns is None:
            report.lines -= 1  # the header is not a data line
            columns = _atomic_header(text, path, required)
            continue
        values = text.rstrip("\r\n").split("\t")
        if len(values) < len(columns):
            report.add_bad(line_no, f"{len(values)} TAB-separated fields, the header has {len(columns)}")
            continue
        yield line_no, {name: values[i] for name, i in columns.items()}


def iter_recbole_atomic(path: Path, report: LineReport) -> Iterator[Row]:
    """Rows of a RecBole ``.inter`` file with ``user_id``, ``item_id``, ``timestamp`` (and optional ``rating``)."""
    for line_no, rec in _atomic_records(path, report, ("user_id", "item_id", "timestamp")):
        try:
            row = Row(
                user=check_id(rec["user_id"], "user_id"),
                item=check_id(rec["item_id"], "item_id"),
                rating=get_number(rec, "rating", default=5.0),
                timestamp=get_number(rec, "timestamp"),
                line=line_no,
            )
        except BadLine as err:
            report.add_bad(line_no, str(err))
            continue
        yield row


def read_recbole_item_text(path: Path, report: LineReport, keep: set[str]) -> dict[str, ItemText]:
    """MovieLens item text from a RecBole ``.item`` file: ``movie_title (release_year)`` and genres."""
    out: dict[str, ItemText] = {}
    for _, rec in _atomic_records(path, report, ("item_id",)):
        item = rec["item_id"].strip()
        if item not in keep or item in out:
            continue
        title, year = clean_text(rec.get("movie_title")), rec.get("release_year", "").strip()
        out[item] = ItemText(
            title=f"{title} ({year})" if title and year else title,
            categories=", ".join(rec.get("class", "").split()),
        )
    return out


# ---------------------------------------------------------------------------------------- Beauty
def locate_beauty(folder: Path) -> Path:
    """The ``<X>.txt`` sequence file in a folder (the one whose name has a single dot)."""
    found = sorted(p for p in folder.glob("*.txt") if p.name.count(".") == 1)
    if len(found) != 1:
        raise PrepError(
            f"raw_format=beauty_p5 needs exactly one sequence file <X>.txt in {folder}, found "
            f"{[p.name for p in found] or 'none'}; point --raw_file at the file (e.g. .../beauty_p5/Beauty.txt)."
        )
    return found[0]


def iter_beauty_p5(path: Path, report: LineReport) -> Iterator[Row]:
    """Rows of ``Beauty.txt``: ``user item_1 ... item_n`` per line; the position is the timestamp."""
    for line_no, text in iter_lines(path, report):
        tokens = text.split()
        if len(tokens) < 2:
            report.add_bad(line_no, "a user id without items")
            continue
        for pos, item in enumerate(tokens[1:]):
            yield Row(user=tokens[0], item=item, rating=5.0, timestamp=float(pos), line=line_no)


def _load_json(path: Path, report: LineReport) -> dict[str, Any]:
    """A whole-file JSON object; a damaged file is an error naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PrepError(f"{path} is not valid JSON ({err}); download it again.") from None
    if not isinstance(obj, dict):
        raise PrepError(f"{path} must hold one JSON object {{id: ...}}, not a {type(obj).__name__}.")
    report.lines += len(obj)
    return obj


def read_beauty_attributes(path: Path, report: LineReport, keep: set[str]) -> dict[str, ItemText]:
    """Item text from ``Beauty.item_attributes.json``: brand (see the module docstring) and categories."""
    data = _load_json(path, report)
    attrs: dict[str, list[str]] = {}
    for key, value in data.items():
        names = value.get("attributes") if isinstance(value, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            report.add_bad(f"item {key!r}", 'expected {"asin": ..., "attributes": [str, ...]}')
            continue
        attrs[str(key)] = names
    later = {name for names in attrs.values() for name in names[1:]}  # names seen after position 0 = categories
    out: dict[str, ItemText] = {}
    for item, names in attrs.items():
        if item in keep:
            has_brand = bool(names) and names[0] not in later
            out[item] = ItemText(
                brand=clean_text(names[0]) if has_brand else "",
                categories=clean_text(names[1:] if has_brand else names, sep=", ", unique=True),
            )
    return out


# -------------------------------------------------------------------------------- CGR json (Scientific)
def locate_cgr(folder: Path) -> Path:
    """The single ``<X>.inter.json`` in a folder."""
    found = sorted(folder.glob("*.inter.json"))
    if len(found) != 1:
        raise PrepError(
            f"raw_format=cgr_json needs exactly one <X>.inter.json in {folder}, found "
            f"{[p.name for p in found] or 'none'}; point --raw_file at the file."
        )
    return found[0]


def iter_cgr_json(path: Path, report: LineReport) -> Iterator[Row]:
    """Rows of ``{user: [item, ...]}`` (chronological lists); the position is the timestamp."""
    for index, (user, items) in enumerate(_load_json(path, report).items(), 1):
        try:
            if not isinstance(items, list) or not items:
                raise BadLine("expected a non-empty list of item ids")
            if not all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in items):
                raise BadLine("item ids must be strings or integers")
            user_id = check_id(str(user), "user id")
            item_ids = [check_id(str(i), "item id") for i in items]
        except BadLine as err:
            report.add_bad(f"user {user!r}", str(err))
            continue
        for pos, item in enumerate(item_ids):
            yield Row(user=user_id, item=item, rating=5.0, timestamp=float(pos), line=index)


def read_cgr_item_text(path: Path, report: LineReport, keep: set[str]) -> dict[str, ItemText]:
    """Item text from ``<X>.item.json`` ``{item: {title, description, brand, categories}}``."""
    out: dict[str, ItemText] = {}
    for key, value in _load_json(path, report).items():
        if not isinstance(value, dict):
            report.add_bad(f"item {key!r}", "expected an object with title / description / brand / categories")
            continue
        if str(key) in keep:
            out[str(key)] = ItemText(
                title=clean_text(value.get("title")),
                brand=clean_text(value.get("brand")),
                categories=clean_text(_split_commas(value.get("categories")), sep=", ", unique=True),
                description=clean_text(value.get("description")),
            )
    return out


def _split_commas(value: Any) -> Any:
    """CGR joins categories with bare commas ("A,B,C"); split them so every format joins with ", "."""
    return value.split(",") if isinstance(value, str) else value


def _dataset_folder(cfg: Config) -> Path:
    """Sequence formats look for their files in the dataset folder when raw_file is empty."""
    return cfg.dataset_dir


FORMATS: dict[str, RawFormat] = {
    "ml-100k": RawFormat(
        read_rows=iter_recbole_atomic,
        read_text=read_recbole_item_text,
        default_raw=lambda cfg: ml100k_dir() / "ml-100k.inter",
        meta_candidates=lambda raw: [raw.with_suffix(".item")],
        expected="a RecBole atomic file: TAB-separated, header user_id:token item_id:token rating:float timestamp:float",
        source="the recbole package (pip install recbole==1.2.1 ships recbole/dataset_example/ml-100k)",
    ),
    "beauty_p5": RawFormat(
        read_rows=iter_beauty_p5,
        read_text=read_beauty_attributes,
        default_raw=_dataset_folder,
        meta_candidates=lambda raw: [raw.with_name(raw.stem + ".item_attributes.json")],
        expected="one line per user: 'user item_1 item_2 ...' (space-separated, chronological)",
        source="the S3-Rec/P5 Beauty files (../shared/data/beauty_p5: Beauty.txt + Beauty.item_attributes.json)",
        locate=locate_beauty,
    ),
    "cgr_json": RawFormat(
        read_rows=iter_cgr_json,
        read_text=read_cgr_item_text,
        default_raw=_dataset_folder,
        meta_candidates=lambda raw: [raw.with_name(raw.name.removesuffix(".inter.json") + ".item.json")],
        expected='one JSON object {"user": [item, ...]} (chronological lists)',
        source="the CollisionGenRec files (../shared/data/scientific2018_cgr: Scientific.inter.json + Scientific.item.json)",
        locate=locate_cgr,
    ),
}
