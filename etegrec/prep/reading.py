"""Step 1, reading: raw lines and fields into rows, and counting and reporting the malformed ones.

Every reader yields ``Row`` tuples (and ``ItemText`` for metadata) and counts its input lines in a
``LineReport``; a malformed line raises ``BadLine`` inside the reader, which reports it as ``file:line: reason``
and goes on. ``RawFormat`` describes one raw format: how to read it, where its files are, what it looks like.
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import logging
import math
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from tqdm import tqdm

from etegrec.config import Config
from etegrec.errors import PrepError

logger = logging.getLogger("etegrec.prep")

MAX_EXAMPLES = 5  # malformed lines quoted in the log and in the error message
_TAGS = re.compile(r"<[^>]{0,500}>")


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

