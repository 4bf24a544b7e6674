"""The one error type every config section raises, so the CLI can print one line and exit 2.

Components validate their own dataclass in `__post_init__` with `require(...)`; the loader in
`watchtower.config` adds the section prefix, so a message always names the full key
(`model.dim`), the bad value and what is allowed.
"""

from __future__ import annotations

from typing import Any

EXIT_CONFIG = 2  # a refused config's exit code: the CLI's, so a supervised group's too (the policy stops on it)


class ConfigError(ValueError):
    """A config value is wrong. `field` is the dotted key; the message says what would be right."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(self._render())

    def _render(self) -> str:
        return f"config error: {self.field} = {self.value!r}: {self.allowed}"

    def under(self, prefix: str) -> "ConfigError":
        """The same error with its field placed under a section (`dim` -> `model.dim`)."""
        return ConfigError(f"{prefix}.{self.field}" if prefix else self.field, self.value, self.allowed)


def require(condition: bool, field: str, value: Any, allowed: str) -> None:
    """Raise a ConfigError naming `field` unless `condition` holds."""
    if not condition:
        raise ConfigError(field, value, allowed)
