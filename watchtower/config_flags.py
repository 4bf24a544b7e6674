"""The trainer config as command-line flags: every key as `--section.key`, with its type, default and
the first sentence of its doc, generated from the config dataclasses, so `watchtower train --help`
can never fall behind the config.

A field's doc is read where the project writes it: a `name: text` entry in its class's docstring
(at a line's start or after `. ` / `; `, running to the next entry or blank line), else the
`# comment` on the field's line. Values stay strings here: `toml_dataclasses.build` coerces and
validates them, so a bad value is the same one-line config error from a flag as from a file.
Torch-free; reading the docs costs one `inspect.getsource` per config class, at `--help` time.

>>> from dataclasses import dataclass, field
>>> @dataclass
... class Demo:
...     '''window: steps in the baseline. Longer is smoother; patience: steps in a row.'''
...     window: int = 100
...     patience: int = 1
...     tags: list[str] = field(default_factory=list)
>>> for k in config_keys(Demo, "demo"): print(k.key, k.type_name, k.default_text, repr(k.doc))
demo.window int 100 'steps in the baseline.'
demo.patience int 1 'steps in a row.'
demo.tags list[str] [] ''
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Any

from watchtower.toml_dataclasses import toml_value
from watchtower.validation import ConfigError


@dataclass(frozen=True)
class ConfigKey:
    key: str  # dotted, e.g. model.dim
    type_name: str  # int, float, str, bool, list[str]
    default_text: str  # the default as it is written in TOML
    doc: str  # first sentence of the field's doc; "" when it has none


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else str(tp).replace("typing.", "")


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def first_sentence(text: str) -> str:
    """Up to the first `. ` (not `e.g. ` / `i.e. `), whitespace collapsed.

    >>> first_sentence("steps to run. More  here.")
    'steps to run.'
    """
    text = " ".join(text.split())
    found = re.search(r"(?<!\be\.g)(?<!\bi\.e)\.\s", text)
    return text[: found.start() + 1] if found else text


def _docstring_entries(doc: str, names: list[str]) -> dict[str, str]:
    """`name: text` entries of a class docstring, for the given field names only."""
    entries: dict[str, str] = {}
    pattern = re.compile(r"(?:^|(?<=[.;] ))(" + "|".join(map(re.escape, names)) + r"): ")
    for paragraph in re.split(r"\n\s*\n", doc):
        flat = " ".join(paragraph.split())
        starts = list(pattern.finditer(flat))
        for this, after in zip(starts, [*starts[1:], None]):
            text = flat[this.end(): after.start() if after else len(flat)].strip().rstrip(";")
            entries.setdefault(this.group(1), text)
    return entries


def _line_comments(cls: type) -> dict[str, str]:
    """The `# comment` on each field's own line in the class source ({} when there is no source)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    (body,) = ast.parse(source).body
    return {node.target.id: comments[node.end_lineno] for node in body.body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.end_lineno in comments}


def field_docs(cls: type) -> dict[str, str]:
    """Each documented field's doc, first sentence only (see the module docstring for where from)."""
    names = [f.name for f in dataclasses.fields(cls)]
    doc = cls.__doc__ or ""
    if doc.startswith(f"{cls.__name__}("):  # the signature @dataclass writes when there is no docstring
        doc = ""
    docs = {**_line_comments(cls), **_docstring_entries(inspect.cleandoc(doc), names)}
    return {name: first_sentence(text) for name, text in docs.items() if text}


def config_keys(cls: type, prefix: str = "") -> list[ConfigKey]:
    """Every leaf key under `cls`, depth first in field order (nested sections become `a.b.key`)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    keys: list[ConfigKey] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            keys += config_keys(hints[f.name], key)
        else:
            keys.append(ConfigKey(key, _type_name(hints[f.name]), toml_value(_default(f)), docs.get(f.name, "")))
    return keys


def _section_doc(cls: type, section: str) -> str | None:
    """The first sentence of a section class's docstring, unless it opens with a field's entry."""
    for part in section.split("."):
        cls = typing.get_type_hints(cls)[part]
    doc = inspect.cleandoc(cls.__doc__ or "")
    names = {f.name for f in dataclasses.fields(cls)}
    if not doc or doc.startswith(f"{cls.__name__}(") or doc.partition(":")[0] in names:
        return None
    return first_sentence(doc.split("\n\n")[0]).replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> list[str]:
    """One argparse group per section, one optional string flag per key; returns the flags.

    Absent flags leave nothing in the namespace (SUPPRESS), so only what was typed overrides the
    file; `join_flag_values` refuses a flag with no value before argparse sees it."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    flags = []
    for k in config_keys(cls):
        section = k.key.rpartition(".")[0]
        if section not in groups:
            groups[section] = parser.add_argument_group(f"[{section}] keys", _section_doc(cls, section))
        help_text = f"{k.doc} (default: {k.default_text})" if k.doc else f"default: {k.default_text}"
        groups[section].add_argument(f"--{k.key}", dest=k.key, metavar=k.type_name,
                                     default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
        flags.append(f"--{k.key}")
    return flags


def join_flag_values(argv: list[str], flags: list[str]) -> list[str]:
    """`--optim.lr -1e-3` -> `--optim.lr=-1e-3` for the known flags: argparse would read a value that
    starts with '-' (other than a plain negative number) as an unknown option instead. A known flag
    with nothing after it is a ConfigError (one line), not argparse's usage message.

    >>> join_flag_values(["--optim.lr", "-1e-3", "--steps", "4"], ["--optim.lr", "--model.dim"])
    ['--optim.lr=-1e-3', '--steps', '4']
    """
    known, out, i = set(flags), [], 0
    while i < len(argv):
        if argv[i] in known:
            if i + 1 == len(argv):
                raise ConfigError(argv[i][2:], None, f"needs a value, e.g. {argv[i]} VALUE (see --help for its type)")
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def overrides_from(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (dotted key, value) pairs the generated flags parsed, in command-line order."""
    return [(key, value) for key, value in vars(args).items() if "." in key]
