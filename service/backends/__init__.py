"""Compute backends: one step interface (`base.Backend`), one file per backend, one selector."""

from .base import Backend
from .selector import NAMES, available, build, choose

__all__ = ["Backend", "NAMES", "available", "build", "choose"]
