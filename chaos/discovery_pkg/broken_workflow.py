"""Raises at import on purpose: discovery must report it and still load the other modules."""

from __future__ import annotations

raise RuntimeError("chaos: this workflow module is broken on purpose")
