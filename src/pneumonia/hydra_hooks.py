"""Hydra callbacks and resolvers that keep a run folder's history whole, and what a run asks
Hydra about itself (its overrides, its chosen options, whether it is a sweep job).

- ``${pneumonia.record_dir:<output_dir>}`` (``hydra.output_subdir``): a run folder that already has a
  Hydra record (a resumed run, a repeated sweep job) gets the new one beside it, in
  ``.hydra/rerun-<time>/``, instead of Hydra overwriting the original overrides.
- ``${pneumonia.job_dirname:<job number>}`` (``hydra.sweep.subdir``): a sweep
  job's folder is named by its overrides (``optimizer=sgd,optimizer.lr=0.01``), so TensorBoard
  shows each run by what it changed, and a rerun of the sweep finds each job's own folder again.
- ``${pneumonia.cpu_precision:}`` (``trainer.precision`` of ``trainer=cpu``): bf16 autocast where
  the CPU computes bf16 natively, else full precision (:mod:`pneumonia.training.precision`).
- ``${pneumonia.optuna_remaining:…}``, ``${pneumonia.optuna_seed:…}`` and
  ``${pneumonia.optuna_direction:<metric>}`` (``hparams_search=optuna``): a stopped search
  continues its study with the trials still to run, the same sampler seed, and the direction that
  ``optimized_metric`` needs (:mod:`pneumonia.sweeps.optuna_study`).
- :class:`LogFailedJob`: a job that raised writes its traceback into its own task log, which is
  often all a sweep user reads (Hydra prints it only to the terminal).

Importing this module registers the resolvers. Hydra unpickles its callbacks in every launcher
process (joblib, submitit), which imports this module there too.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import traceback
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

RECORD_DIR = ".hydra"
log = logging.getLogger("pneumonia")


def record_dir(output_dir: str) -> str:
    """``.hydra``, or ``.hydra/rerun-<time>`` when ``output_dir`` already holds a Hydra record."""
    if not (Path(output_dir) / RECORD_DIR / "config.yaml").exists():
        return RECORD_DIR
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    return f"{RECORD_DIR}/rerun-{stamp}"


def override_key(override: str) -> str:
    """The key an override sets: ``"+optimizer.lr=0.01"`` -> ``"optimizer.lr"``."""
    return str(override).partition("=")[0].strip().lstrip("+~")


# A folder name stays well below the 255 bytes file systems allow.
MAX_JOB_DIRNAME = 120


def job_dirname(job_num: int | str, *, _root_: DictConfig) -> str:
    """A sweep job's folder name: the values it sweeps (``optimizer=sgd,optimizer.lr=0.01``), by key.

    The swept keys are those of ``hydra.sweeper.params`` and the command line's sweep overrides
    (``optimizer=adam,sgd``, read from the sweep's ``multirun.yaml``); a value given to every job
    alike would only lengthen each name. Without that record (another sweeper) every override
    of the job names it, and without overrides its number does. ``/`` becomes ``_`` (a folder in a
    value would nest folders), and a name longer than :data:`MAX_JOB_DIRNAME` bytes is cut and
    ends with a hash of the whole, so it stays unique.
    """
    hydra_cfg = _root_.hydra
    overrides = [str(o) for o in hydra_cfg.overrides.task]
    excluded = set(hydra_cfg.job.config.override_dirname.exclude_keys or ())
    swept = _swept_keys(hydra_cfg)
    chosen = []
    for override in overrides:
        key = override_key(override)
        # A swept key names the job even if it is one that never names a job otherwise (data.root).
        if (key in swept) if swept is not None else (key not in excluded):
            chosen.append(override)
    # Sorted by key: the same job typed in another order (seed=1 optimizer=sgd) is the same folder.
    name = _folder_name(",".join(sorted(chosen, key=override_key)).strip(), job_num)
    # A sweep begun before names were sorted keeps its folders (rerun to finish it).
    legacy = _folder_name(",".join(chosen).strip(), job_num)
    if legacy != name and (Path(str(hydra_cfg.sweep.dir)) / legacy).is_dir():
        return legacy
    return name


def _folder_name(joined: str, job_num: int | str) -> str:
    name = joined.replace("/", "_").replace("\\", "_")
    if not name or name in (".", ".."):
        return str(job_num)
    if name != joined:  # a/b and a_b must not share a folder
        name = f"{name}-{hashlib.sha1(joined.encode()).hexdigest()[:6]}"
    if len(name.encode()) > MAX_JOB_DIRNAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = name.encode()[: MAX_JOB_DIRNAME - 11].decode(errors="ignore") + "-" + digest
    return name


def _swept_keys(hydra_cfg: DictConfig) -> set[str] | None:
    """The keys a sweep varies, or None when the sweep left no record of them.

    A basic sweep records its command line in ``multirun.yaml``; other sweepers (Optuna) name
    their search space in ``hydra.sweeper.params`` only.
    """
    keys = {str(k).lstrip("+~") for k in (hydra_cfg.sweeper.get("params") or {})}
    record = Path(str(hydra_cfg.sweep.dir)) / "multirun.yaml"
    try:
        launched = OmegaConf.load(record).hydra.overrides.task
    except (OSError, ValueError, AttributeError):
        return keys or None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides([str(o) for o in launched]):
        if override.is_sweep_override():
            keys.add(override.key_or_group)
    return keys


def job_identity(overrides: list[str]) -> list[str]:
    """The overrides that make a sweep job what it is: all but ``exclude_keys`` (where it runs),
    in a fixed order (the same job typed in another order is the same job)."""
    excluded: set[str] = set()
    if HydraConfig.initialized():
        excluded = set(HydraConfig.get().job.config.override_dirname.exclude_keys or ())
    return sorted(o for o in overrides if override_key(o) not in excluded)


def optuna_direction(metric: str) -> str:
    """``maximize`` or ``minimize``: the direction an Optuna search takes for ``optimized_metric``."""
    from pneumonia.training.status import metric_mode

    return "minimize" if metric_mode(str(metric)) == "min" else "maximize"


def register_resolvers() -> None:
    """Register the ``pneumonia.*`` resolvers the config tree uses, once."""
    from pneumonia.sweeps.optuna_study import remaining_trials, sampler_seed

    if not OmegaConf.has_resolver("pneumonia.record_dir"):
        # Cached: Hydra reads hydra.output_subdir twice and must get one folder both times.
        OmegaConf.register_new_resolver("pneumonia.record_dir", record_dir, use_cache=True)
    if not OmegaConf.has_resolver("pneumonia.job_dirname"):
        OmegaConf.register_new_resolver("pneumonia.job_dirname", job_dirname)
    if not OmegaConf.has_resolver("pneumonia.optuna_remaining"):
        # Cached: the sweeper must see one number even if it reads n_trials twice.
        OmegaConf.register_new_resolver(
            "pneumonia.optuna_remaining", remaining_trials, use_cache=True
        )
    if not OmegaConf.has_resolver("pneumonia.optuna_seed"):
        OmegaConf.register_new_resolver("pneumonia.optuna_seed", sampler_seed, use_cache=True)
    if not OmegaConf.has_resolver("pneumonia.optuna_direction"):
        OmegaConf.register_new_resolver("pneumonia.optuna_direction", optuna_direction)
    if not OmegaConf.has_resolver("pneumonia.cpu_precision"):
        OmegaConf.register_new_resolver("pneumonia.cpu_precision", _cpu_precision, use_cache=True)


def _cpu_precision() -> str:
    # Imported when a config asks: torch takes seconds to import, and `python -m pneumonia.compare`
    # (which imports this module) should answer in one.
    from pneumonia.training.precision import cpu_precision

    return cpu_precision()


register_resolvers()


def task_overrides() -> list[str]:
    """The run's own command-line overrides (``key=value``); empty outside a Hydra app."""
    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def hydra_choices() -> dict[str, Any]:
    """The option chosen in each config group (``optimizer: sgd``); empty outside a Hydra app."""
    if not HydraConfig.initialized():
        return {}
    return dict(HydraConfig.get().runtime.choices)


def is_sweep_job() -> bool:
    """Whether this run is one job of a multirun sweep."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class LogFailedJob(Callback):
    """Write a failed job's exception and traceback into the job's task log."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED:
            return
        # The stored exception itself: reading ``return_value`` would print Hydra's "Error
        # executing job" line once more before re-raising it.
        error = getattr(job_return, "_return_value", None)
        if not isinstance(error, BaseException):
            return
        frames = error.__traceback__
        text = "".join(traceback.format_exception(type(error), error, frames))
        record = log.makeRecord(
            log.name, logging.ERROR, __file__, 0, "run failed:\n%s", (text.rstrip(),), None
        )
        # Only the file handlers: Hydra itself prints the traceback on the terminal.
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
