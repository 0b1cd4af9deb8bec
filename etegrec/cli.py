"""The front door of every entry script: ``--help``, and one line ``error: …`` with exit status 2 for bad input.

``run_script(main, __doc__, sections=(...))`` runs ``main(argv)``. ``-h`` / ``--help`` prints the script's
purpose (its docstring), how settings and overrides work, and every key of the config sections the script reads,
with type, range or allowed values, built-in default and meaning; then exits 0. An ``EtegrecError`` (bad config,
missing or inconsistent artifact, unusable raw data, diverged training) is printed as one line on stderr and
exits 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
import typing
from collections.abc import Callable, Sequence
from typing import Any

from etegrec.config import CHOICES, DEVICE_KEYS, DEVICES, LEAVES, RANGE_OF, SECTIONS
from etegrec.errors import EtegrecError

HELP_FLAGS = ("-h", "--help")
SETTINGS_HELP = """\
Settings: built-in defaults, then the YAML file of --config FILE (flat, or nested by section), then --key=value
overrides; later ones win. Overrides: --lr_rec=0.005, --train.lr_rec=0.005, --num_emb_list 256 256 256,
--metrics=recall@5,ndcg@10, --dedup=false. A key means the same in every script; a script ignores the keys of
other stages (they are still recorded in the run's config.yaml). Relative paths in a config are taken from the
repository root; a relative --config file, or an input file given on the command line, that exists under the
working directory means that file. `python -m etegrec.config --config FILE [--key=value ...]` prints the
resolved configuration."""


def run_script(
    main: Callable[[list[str]], Any],
    doc: str | None,
    sections: Sequence[str] | None,
    *,
    default_config: str | None = None,
    argv: Sequence[str] | None = None,
) -> None:
    """Run ``main(argv)`` (``sys.argv[1:]`` by default) as an entry script.

    Args:
        main: the script's work; it gets the command-line arguments.
        doc: the script's docstring (its purpose and usage), printed first by ``--help``.
        sections: the config sections the script reads (``etegrec.config.SECTIONS`` names), listed by ``--help``;
            None when the script's own argument parser answers ``--help``.
        default_config: the YAML file the script reads without ``--config``, named by ``--help``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if sections is not None and any(a in HELP_FLAGS for a in args):
        print(usage(doc, sections, default_config))
        raise SystemExit(0)
    try:
        main(args)
    except EtegrecError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def usage(doc: str | None, sections: Sequence[str], default_config: str | None = None) -> str:
    """The ``--help`` text: purpose, settings rules, and the keys of ``sections``."""
    parts = [textwrap.dedent(doc or "").strip(), SETTINGS_HELP]
    if default_config:
        parts.append(f"Without --config this script reads {default_config}; its values replace the defaults below.")
    parts += [describe_section(name) for name in sections]
    return "\n\n".join(p for p in parts if p)


def describe_section(name: str) -> str:
    """One section's keys: ``--key=DEFAULT  (type, range or allowed values)`` and the help text below it."""
    cls = SECTIONS[name]
    lines = [f"[{name}] {cls.__doc__.strip().splitlines()[0]}"]
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        lines.append(f"  --{f.name}={shown}  ({_kind(f.name)})")
        lines += textwrap.wrap(f.metadata["help"], width=112, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def _kind(key: str) -> str:
    """``float > 0``, ``list[int] >= 1``, ``str: a | b`` ...: the type of a key and what values it takes."""
    tp = LEAVES[key][1].type
    kind = f"list[{typing.get_args(tp)[0].__name__}]" if typing.get_origin(tp) is list else tp.__name__
    if key in RANGE_OF:
        return f"{kind} {RANGE_OF[key]}"
    if key in CHOICES:
        names = CHOICES[key]
        return f"{kind}: {' | '.join(names() if callable(names) else names)}"
    if key in DEVICE_KEYS:
        return f"{kind}: {' | '.join(DEVICES)}"
    return kind
