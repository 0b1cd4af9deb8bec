"""Step 1, the format registry: which reader a ``raw_format`` names, and which input files a config means."""

from __future__ import annotations

from pathlib import Path

from etegrec.config import Config
from etegrec.prep import converters
from etegrec.prep.amazon import AMAZON_FORMATS
from etegrec.errors import PrepError
from etegrec.prep.reading import RawFormat


def raw_formats() -> dict[str, RawFormat]:
    """All supported ``raw_format`` values."""
    return {**AMAZON_FORMATS, **converters.FORMATS}


def _with_gz(path: Path) -> Path:
    """``path`` itself, or ``path.gz`` when only the compressed file is there."""
    gz = path.with_name(path.name + ".gz")
    return gz if not path.exists() and gz.is_file() else path


def find_inputs(cfg: Config, spec: RawFormat) -> tuple[Path, Path | None]:
    """The raw interaction file and the metadata file for this config.

    ``meta_file`` empty (the default) means the format's own metadata file beside the raw file, optional: None
    when it is not there (no item text). A ``meta_file`` given explicitly must exist.
    """
    d = cfg.data
    raw = _with_gz(cfg.dataset_input(d.raw_file) if d.raw_file else spec.default_raw(cfg))
    if not raw.exists():
        how = f"--raw_file={d.raw_file}" if d.raw_file else f"the default for raw_format={d.raw_format}"
        raise PrepError(
            f"raw interaction file {raw} does not exist ({how}). It comes from {spec.source}; "
            "or point --raw_file=PATH at it (relative paths are looked up in the dataset folder "
            f"{cfg.dataset_dir}, then the repository root)."
        )
    if raw.is_dir():
        if spec.locate is None:
            raise PrepError(f"--raw_file={raw} is a folder; raw_format={d.raw_format} needs the review file itself.")
        raw = spec.locate(raw)
    if d.meta_file:
        meta = _with_gz(cfg.dataset_input(d.meta_file))
        if not meta.is_file():
            raise PrepError(
                f"metadata file {meta} (--meta_file={d.meta_file}) does not exist. It comes from the same source as "
                f"the reviews ({spec.source}, the meta_* file); or leave meta_file empty to use the format's "
                "default file when present and prepare without item text otherwise."
            )
        return raw, meta
    return raw, next((m for m in spec.meta_candidates(raw) if m.is_file()), None)
