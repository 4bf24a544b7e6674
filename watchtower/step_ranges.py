"""Step ranges ("FIRST-LAST" or "N"), as `data.skip_steps` and remediation.json write them. Here,
not in watchtower/trainer/data.py (which imports torch), so the supervisor checks a record's ranges
when it starts instead of every launched trainer refusing them after the launch."""

from __future__ import annotations

from watchtower.validation import require


def parse_step_range(text: str, key: str = "skip_steps") -> tuple[int, int]:
    """"FIRST-LAST" or "N" as (first, last); a ConfigError naming `key` otherwise.

    >>> parse_step_range("120-124"), parse_step_range("7")
    ((120, 124), (7, 7))
    """
    first, _, last = str(text).partition("-")
    ok = first.strip().isdigit() and (not last or last.strip().isdigit())
    a, b = (int(first), int(last or first)) if ok else (0, 0)
    require(ok and 1 <= a <= b, key, text, 'must be "FIRST-LAST" or "N": steps >= 1, FIRST <= LAST (e.g. "120-124")')
    return a, b
