import logging
import warnings

import torch
from lightning.pytorch.utilities._pytree import _tree_flatten
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from pneumonia.console import tidy_lightning_console


def test_lightning_messages_print_once_through_the_root_logger():
    root = logging.getLogger()
    package = logging.getLogger("lightning")
    extra = logging.StreamHandler()
    package.addHandler(extra)
    had_root_handler = bool(root.handlers)
    if not had_root_handler:
        root.addHandler(logging.NullHandler())
    try:
        tidy_lightning_console()
        assert extra not in package.handlers
    finally:
        package.removeHandler(extra)
        if not had_root_handler:
            root.handlers = [h for h in root.handlers if type(h) is not logging.NullHandler]


def test_adverts_are_dropped_and_other_messages_kept(caplog):
    tidy_lightning_console()
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: use a cloud logger")
        rank_zero_info("GPU available: False")
    messages = [record.getMessage() for record in caplog.records]
    assert "GPU available: False" in messages
    assert not any(message.startswith("💡 Tip:") for message in messages)


def test_lightnings_pytree_deprecation_is_silenced_and_other_future_warnings_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tidy_lightning_console()
        _tree_flatten([torch.zeros(2), 1])
        warnings.warn("a warning of the user's own", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning of the user's own"]
