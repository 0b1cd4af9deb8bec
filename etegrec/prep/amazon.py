"""Step 1, Amazon review dumps: the 2018, 2014 and 2023 layouts of reviews and metadata.

Reviews: one object per line (``reviewerID, asin, overall, unixReviewTime`` in 2018 and 2014, where lines may
also be Python literals, parsed with ``ast.literal_eval``, never ``eval``; ``user_id, parent_asin, rating,
timestamp`` in ms in 2023). A review without a rating gets 5.0 (the reference does this for its 2023 script
only); the rating is not used by any later stage. Metadata (``meta_<Category>.json[l][.gz]`` beside the
reviews): title, brand, categories and description, cleaned (HTML tags removed, entities unescaped, whitespace
collapsed, lists joined).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etegrec.prep.reading import (
    BadLine,
    ItemText,
    LineReport,
    RawFormat,
    Row,
    clean_text,
    get_id,
    get_number,
    iter_lines,
    parse_object,
)


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

