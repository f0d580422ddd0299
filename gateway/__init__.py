"""idlegate: a gateway that refuses bearer tokens left idle for longer than a timeout."""

from __future__ import annotations

__version__ = "0.1.0"
