"""The sweeper of ``hparams_search=optuna``: Hydra's Optuna sweeper, run by
:func:`pneumonia.sweeps.optuna_study.run_search`.

Hydra builds a sweeper only from the ``hydra_plugins`` namespace, and it imports every module
there at start-up, so this one holds nothing but the thin class and imports Optuna's sweeper (the
``sweep`` extra) only when a search is configured.
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class GuardedOptunaSweeper(Sweeper):
    """``hydra_plugins.hydra_optuna_sweeper``'s ``OptunaSweeper``, with the same settings, whose
    search refuses a second concurrent search of its study, closes trials a killed search left
    running, and says plainly when none of its trials completed."""

    def __init__(self, **settings: Any) -> None:
        from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

        self.optuna = OptunaSweeper(**settings)
        self.config: DictConfig | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.optuna.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        from pneumonia.sweeps.optuna_study import run_search

        assert self.config is not None, "Hydra calls setup() before sweep()"
        run_search(lambda: self.optuna.sweep(arguments), self.config)
