"""One copy of every console line.

Under Hydra the root logger prints every record (and writes the run's log file); the ``lightning``
package adds its own console handler as well, so each Lightning message appeared twice, and it
advertises a cloud logger on every run. :func:`tidy_lightning_console` removes that handler (its
messages still reach the terminal and the log file through the root logger) and the advert.
"""

from __future__ import annotations

import logging

ADVERTS = ("💡 Tip:",)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERTS)


def tidy_lightning_console() -> None:
    """Leave Lightning's messages to the root logger's handlers when it has any; drop adverts."""
    import lightning  # noqa: F401 - adds the handler this removes

    package = logging.getLogger("lightning")
    if logging.getLogger().handlers:
        for handler in list(package.handlers):
            if type(handler) is logging.StreamHandler:
                package.removeHandler(handler)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in logger.filters):
            logger.addFilter(_DropAdverts())
