"""`watchtower alerts export DIR`: the shipped rule and Alertmanager files, written for a Prometheus host.

Each exported file is the shipped one behind a first line saying that an export wrote it, with the
sha256 of the rest. A later export overwrites a file only when that line is there and the rest still
matches it: exactly what an export wrote (of this or an older Watchtower), so an upgrade refreshes it.
A file a person wrote, or edited after the export (Alertmanager's receivers are placeholders to be
filled in), is refused before anything is written: one line naming the file, exit 2. So is a
symlink, even to an exported file or to nothing: the atomic write would replace the link by a plain
file and leave the file it names stale. Costs reading and hashing two small files.

>>> written_by_export(exported_text("groups: []\\n"))
True
>>> written_by_export(exported_text("groups: []\\n").replace("[]", "[x]"))
False
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from watchtower import __version__, shipped
from watchtower.atomic_write import write_atomic
from watchtower.validation import ConfigError

FIELD = "alerts export DIR"
_HEADER = re.compile(r"# written by `watchtower alerts export` \(watchtower [^)]*\); sha256 of the rest: "
                     r"([0-9a-f]{64})\. Edit it and the next export leaves it alone\.\n")


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def exported_text(body: str) -> str:
    """The shipped `body` behind the header that lets a later export recognise its own file."""
    return (f"# written by `watchtower alerts export` (watchtower {__version__}); sha256 of the rest: "
            f"{_digest(body)}. Edit it and the next export leaves it alone.\n{body}")


def written_by_export(text: str) -> bool:
    """True when `text` is an export's header followed by exactly the body it hashed."""
    first, newline, body = text.partition("\n")
    found = _HEADER.fullmatch(first + newline)
    return found is not None and found.group(1) == _digest(body)


def export_alerts(directory: Path) -> list[Path]:
    """Write rules.yml and alertmanager.yml into `directory` (created if missing); every refusal is
    decided before the first write, so a refused export leaves the directory as it was."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(FIELD, str(directory), "is a file; give a directory (it is created if missing)")
    sources = [shipped.rules_file(), shipped.alertmanager_file()]
    for source in sources:
        target = directory / source.name
        if target.is_symlink():
            raise ConfigError(FIELD, str(target), f"is a symlink (to {os.readlink(target)}), which the export would "
                              "replace by a file; export into the directory that holds the real file")
        if target.exists() and not (target.is_file() and written_by_export(target.read_text(errors="replace"))):
            raise ConfigError(FIELD, str(target), "exists and was not written by `watchtower alerts export` "
                              "(or was edited since); move it away or export into another directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a parent is a file, no permission
        raise ConfigError(FIELD, str(directory), f"cannot be created: {err.strerror}") from None
    targets = [directory / source.name for source in sources]
    for source, target in zip(sources, targets):
        write_atomic(target, exported_text(source.read_text()))
    return targets
