"""Find the configuration the command line runs with: `--config MODULE:ATTR`, `SONAMU_TASKS_CONFIG`, or
`sonamu_config:config` in the current directory; the defaults when none of them exists."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping

from .config import Config, define_config
from .errors import ConfigError

CONFIG_ENV = "SONAMU_TASKS_CONFIG"
DEFAULT_CONFIG = "sonamu_config:config"


def load_config(spec: str | None = None) -> tuple[Config, str]:
    """Return the config and where it came from (for messages)."""
    explicit = spec or os.environ.get(CONFIG_ENV)
    target = explicit or DEFAULT_CONFIG
    module_name, _, attribute = target.partition(":")
    attribute = attribute or "config"
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the application's modules live beside its config
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if explicit is None and error.name == module_name:
            return define_config(), "defaults (no sonamu_config.py here)"
        raise ConfigError(f"cannot import the config module {module_name!r} ({target}): {error}") from error
    value = getattr(module, attribute, None)
    if isinstance(value, Mapping):
        value = define_config(**value)
    if not isinstance(value, Config):
        raise ConfigError(f"{target}: expected a config made by define_config(...), got {type(value).__name__}")
    return value, target
