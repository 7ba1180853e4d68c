"""One copy of every console line.

Under Hydra the root logger prints every record (and writes the run's log file); the ``lightning``
package adds its own console handler as well, so each Lightning message appeared twice, and it
advertises a cloud logger on every run. :func:`tidy_lightning_console` removes that handler (its
messages still reach the terminal and the log file through the root logger) and the advert.
It also silences one FutureWarning that Lightning 2.6 triggers inside torch >= 2.10 on every run
(``isinstance(treespec, LeafSpec)`` is deprecated): it is about Lightning's code, not the user's,
and says nothing they can act on.
"""

from __future__ import annotations

import logging
import warnings

ADVERTS = ("💡 Tip:",)
# Raised by torch.utils._pytree when Lightning's _tree_flatten builds a LeafSpec.
LIGHTNING_LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERTS)


def tidy_lightning_console() -> None:
    """Leave Lightning's messages to the root logger's handlers when it has any; drop adverts and
    Lightning's pytree deprecation warning."""
    import lightning  # noqa: F401 - adds the handler this removes

    warnings.filterwarnings("ignore", message=LIGHTNING_LEAFSPEC_WARNING, category=FutureWarning)

    package = logging.getLogger("lightning")
    if logging.getLogger().handlers:
        for handler in list(package.handlers):
            if type(handler) is logging.StreamHandler:
                package.removeHandler(handler)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in logger.filters):
            logger.addFilter(_DropAdverts())
