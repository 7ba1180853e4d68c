"""An Optuna search that a stop does not lose: how many trials remain, and stale trials closed.

Hydra's Optuna sweeper (``hparams_search=optuna``) keeps its study in a database and loads it
again on a rerun, but its ``n_trials`` counts the trials of *this* invocation, and a trial killed
mid-run stays ``RUNNING`` in the study for ever. Here:

- :func:`remaining_trials` (the ``${pneumonia.optuna_remaining:...}`` resolver of the preset) makes
  ``n_trials`` the number of trials the study still lacks to reach its total, so rerunning the
  same command finishes a stopped search, and running it again after that does nothing;
- :func:`sampler_seed` (``${pneumonia.optuna_seed:...}``) offsets the sampler's seed by the trials
  the study already has: a seeded sampler starts afresh on every invocation, and would otherwise
  propose the first run's points again;
- :func:`run_search` (what the preset's sweeper, ``hydra_plugins.pneumonia_optuna``, runs)
  creates the database's folder and the sweep folder, refuses to start while another search of
  the same study runs (a lock in the sweep folder, held until the search's process ends), marks
  trials left ``RUNNING`` by a killed search as failed, so the sampler does not wait on them,
  refuses to add trials run under other fixed settings (:func:`fixed_settings`) to a study, and
  says plainly when no trial of the study completed. It is a sweeper and not a Hydra callback
  because Hydra turns an exception in a callback into a warning and goes on.

Optuna is imported only when a search runs (it is in the ``sweep`` extra).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pneumonia.errors import SweepError
from pneumonia.locks import close_lock_file, open_lock_file, try_lock

log = logging.getLogger("pneumonia")
SQLITE = "sqlite:///"
LOCK_FILE = ".optuna.lock"
# Open lock files by sweep folder, held for the life of the search's process.
_HELD_LOCKS: dict[str, int] = {}


def remaining_trials(storage: str | None, study_name: str, total: int) -> int:
    """``total`` less the study's finished trials (complete or pruned); ``total`` for a new study."""
    total = int(total)
    if total < 0:
        raise ValueError(f"the number of trials must be 0 or more, got {total}")
    study = _load(storage, study_name)
    if study is None:
        return total
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = len(study.get_trials(deepcopy=False, states=states))
    return max(0, total - finished)


def sampler_seed(storage: str | None, study_name: str, seed: int | None) -> int | None:
    """``seed`` plus the number of trials the study holds (``None`` stays unseeded)."""
    if seed is None:
        return None
    study = _load(storage, study_name)
    return int(seed) + (len(study.get_trials(deepcopy=False)) if study is not None else 0)


def _load(storage: str | None, study_name: str) -> Any:
    """The study, or None when its database or the study does not exist yet."""
    if not storage or not _database_exists(str(storage)):
        return None
    import optuna

    try:
        return optuna.load_study(study_name=str(study_name), storage=str(storage))
    except KeyError:
        return None


def _database_exists(storage: str) -> bool:
    if storage.startswith(SQLITE):
        return Path(storage[len(SQLITE) :]).is_file()
    return True  # a database server: ask it


def run_search(sweep: Callable[[], None], config: DictConfig) -> None:
    """Prepare the study of ``config.hydra.sweeper``, then ``sweep()``; say so if no trial completed.

    Called by the ``hparams_search=optuna`` sweeper (``hydra_plugins.pneumonia_optuna``) with
    Hydra's own Optuna sweep. It ends the way Hydra's does, except that a search whose trials all
    failed raises :class:`~pneumonia.errors.SweepError` naming the summary, where Optuna's
    ``study.best_trial`` would say only "Record does not exist".
    """
    sweeper = config.hydra.sweeper
    storage = prepare_study(config)
    try:
        sweep()
    except ValueError:
        study = _load(storage, sweeper.study_name) if storage else None
        if study is None or _count(study, "COMPLETE"):
            raise
        name, trials = str(sweeper.study_name), len(study.get_trials(deepcopy=False))
        if not trials:
            raise SweepError(
                f"Optuna study {name!r} has no trial: give optuna_trials a number above 0"
            ) from None
        summary = Path(str(config.hydra.sweep.dir)) / "summary.md"
        raise SweepError(
            f"Optuna study {name!r} has no completed trial: all {trials} failed. Each trial's "
            f"error is in {summary} and in its folder's debug.log. Fix the cause and rerun the "
            "same command: failed trials do not count towards optuna_trials."
        ) from None


def prepare_study(config: DictConfig) -> str | None:
    """Before a search: its folders exist, no other search of the study runs, no trial stays running.

    Returns the study's storage (None for an in-memory study). Raises :class:`SweepError` when
    another search of the same study holds its lock.
    """
    sweeper = config.hydra.sweeper
    # The sweeper writes optimization_results.yaml there even when no trial remains.
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _lock(sweep_dir, str(sweeper.study_name))
    storage = sweeper.get("storage")
    if not storage:
        return None
    storage = str(storage)
    if storage.startswith(SQLITE):
        Path(storage[len(SQLITE) :]).parent.mkdir(parents=True, exist_ok=True)
    import optuna

    study = _load(storage, sweeper.study_name)
    if study is None:
        # Created here (the sweeper loads it) so that it records what it searches under.
        study = optuna.create_study(
            study_name=str(sweeper.study_name),
            storage=storage,
            directions=_directions(sweeper.direction),
            load_if_exists=True,
        )
    _check_same_fixed_settings(study, config)
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in stale:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    if stale:
        log.warning(
            "marked %d trial(s) of study %r failed: a stopped search left them running (%s)",
            len(stale),
            str(sweeper.study_name),
            ", ".join(str(t.number) for t in stale),
        )
    log.info(
        "Optuna study %r in %s: %d trial(s) complete, %s to run",
        str(sweeper.study_name),
        storage,
        _count(study, "COMPLETE"),
        sweeper.n_trials,
    )
    return storage


#: The study's record of the overrides its trials share (user attribute).
FIXED_SETTINGS = "pneumonia_fixed_overrides"
# Overrides that say how many trials there are or how the machine runs them, not what they are
# (with those of the HPARAMS tab: where a run reads or writes, how it reports).
_NOT_SETTINGS = (
    "optuna_trials", "trainer.devices", "trainer.accelerator", "trainer.strategy",
    "data.num_workers", "data.decode_workers", "data.pin_memory", "data.batches_on_device",
)  # fmt: skip


def fixed_settings(config: DictConfig) -> list[str]:
    """What every trial of the search shares, sorted: the command line's overrides (``image_size=64``,
    ``debug=limit``, a searched key pinned to one value) but the search space itself and where or
    how the trials run, plus the data root the trials read (an environment variable can move it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from pneumonia.training.hparams_session import (
        NOT_HYPERPARAMETER_PREFIXES,
        NOT_HYPERPARAMETERS,
    )

    searched = {str(key).lstrip("+~") for key in (config.hydra.sweeper.get("params") or {})}
    parser = OverridesParser.create()
    settings = []
    for text in OmegaConf.select(config, "hydra.overrides.task") or []:
        override = parser.parse_override(str(text))
        key = override.get_key_element().lstrip("+~")
        if (
            (key in searched and override.is_sweep_override())
            or key in (*NOT_HYPERPARAMETERS, *_NOT_SETTINGS)
            or key.startswith(NOT_HYPERPARAMETER_PREFIXES)
        ):
            continue
        settings.append(str(text))
    root = OmegaConf.select(config, "data.root", default=None, throw_on_resolution_failure=False)
    if root:
        settings.append(f"data.root={Path(str(root)).expanduser().resolve()}")
    return sorted(settings)


def _check_same_fixed_settings(study: Any, config: DictConfig) -> None:
    """Record the study's fixed settings; refuse to add trials run under other ones.

    TPE learns from every trial of a study and ``optuna_trials`` counts them all: trials of a
    ``debug=limit`` smoke test, or at another image size, would steer and shorten the real search.
    """
    settings = fixed_settings(config)
    recorded = study.user_attrs.get(FIXED_SETTINGS)
    if recorded is None:
        study.set_user_attr(FIXED_SETTINGS, settings)
        return
    if list(recorded) != settings:
        name = str(config.hydra.sweeper.study_name)
        raise SweepError(
            f"Optuna study {name!r} was searched with the fixed settings {list(recorded)}, not "
            f"{settings}: its trials would join and count towards that search. Give this search "
            f"its own study (hydra.sweeper.study_name={name}_2), or repeat the first one's settings"
        )


def _directions(direction: Any) -> list[str]:
    """``hydra.sweeper.direction`` (a name or a list of names) as Optuna's list of directions."""
    names = [direction] if isinstance(direction, str) else list(direction)
    return [str(getattr(name, "name", name)).lower() for name in names]


def _count(study: Any, state: str) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState[state],)))


def _lock(sweep_dir: Path, study_name: str) -> None:
    """Hold the study's lock until this process ends; refuse if another search holds it."""
    path = sweep_dir / LOCK_FILE
    if str(path) in _HELD_LOCKS:
        return
    descriptor = open_lock_file(path)
    try:
        locked = try_lock(descriptor)
    except OSError as err:
        log.warning("cannot lock %s (%s): a second search of the study is not refused", path, err)
        locked = True
    if not locked:
        close_lock_file(descriptor)
        raise SweepError(
            f"another Optuna search of study {study_name!r} is running (it holds {path}); wait "
            "for it, or give this search another hydra.sweeper.study_name"
        )
    _HELD_LOCKS[str(path)] = descriptor
