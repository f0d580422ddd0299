"""The one base of the errors that stop the gateway before it serves.

A config problem (`config.ConfigError`), an unusable key file or secret
(`tokens.keys.KeySourceError`), store settings (`store.factory.StoreConfigError`) or an admin
token file (`admin.AdminTokenError`): the CLI catches `StartupError` alone and prints each of
its `lines()` as `idlegate: ...`, never a traceback, and exits 2.
"""

from __future__ import annotations


class StartupError(Exception):
    """Raised by construction or start-up; the message starts with the config field at fault."""

    def lines(self) -> list[str]:
        """What the CLI prints, one problem a line."""
        return [str(self)]
