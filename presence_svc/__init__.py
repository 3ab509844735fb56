"""presence-svc: who is in a study right now, what they are doing, and where their cursor is."""

from __future__ import annotations

__version__ = "0.2.0"
