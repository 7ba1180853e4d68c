"""One run, as ``train.py`` launches it: fit, test the best checkpoint, or only evaluate a checkpoint."""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from pneumonia.config import NEVER_VALIDATED, check_train_config
from pneumonia.data.datamodule import ChestXrayDataModule
from pneumonia.errors import CheckpointError, ConfigError, NeverValidatedError, NothingTrainedError
from pneumonia.hydra_hooks import is_sweep_job, job_identity, task_overrides
from pneumonia.metrics.diagnostic import METRIC_NAMES
from pneumonia.metrics.evaluation import warn_if_one_class
from pneumonia.metrics.outside_pool import measure_outside_pool, measures_outside_pool
from pneumonia.metrics.report import (
    TestReportWriter,
    add_to_test_report,
    format_metrics_table,
    retire_test_report,
)
from pneumonia.model.classifier import XrayClassifier, to_plain
from pneumonia.sweeps.callback import summarize_interrupted_job
from pneumonia.training.callbacks import BestEpochMetrics, StatusProgress, StopOnDivergence
from pneumonia.training.checkpoint_data import (
    checkpoint_data,
    copies_of_training_images,
    training_pool,
)
from pneumonia.training.checkpoints import (
    CHECKPOINT_DIR,
    LAST,
    last_checkpoint,
    load_classifier,
    read_hyperparameters,
    recorded_score,
    resolve_checkpoint,
)
from pneumonia.training.hparams_session import NOT_HYPERPARAMETERS
from pneumonia.training.loggers import (
    ContinuingCSVLogger,
    ContinuingTensorBoardLogger,
    continue_logs,
)
from pneumonia.training.progress import StepProgressBar
from pneumonia.training.random_stream import RandomStreamCheckpoint
from pneumonia.training.record import RunRecord, fitted_last_checkpoint, resume_command
from pneumonia.training.resume import ResumePoint, step_settings
from pneumonia.training.schedulers import cycles_momentum
from pneumonia.training.status import COMPLETED, FAILED, INTERRUPTED, hold_run_folder, read_status

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float | None:
    """Run the task the config describes and return the optimised metric (for sweepers).

    ``cfg.fit`` true: train, then (``cfg.test``) test the best checkpoint on the test split; returns
    the best validation value of ``optimized_metric`` (or its test value for a ``test/`` metric).
    ``cfg.fit`` false: evaluate ``cfg.ckpt_path`` on the test split it was trained with
    (``cfg.checkpoint_split``), or on every image of ``cfg.data.root`` (``conf/eval.yaml``);
    returns that test balanced accuracy.

    The run folder's ``run_status.json`` says whether it is running, completed or failed (and why),
    and TensorBoard's HPARAMS tab gets the run once it has ended. In a sweep, a job whose folder
    records it completed is skipped, and one that was interrupted resumes from its ``last.ckpt``.

    Raises:
        ConfigError: the config contradicts itself (checked before anything runs).
        TrainingDivergedError: the training loss became NaN or infinite (no test is reported).
        NothingTrainedError: the fit took no training step (no test is reported).
        SplitChangedError, CheckpointError: a resume would change the run's split or model.
    """
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank != 0:  # strategy=ddp runs this once per rank, in one folder
        return _run(cfg, output_dir)
    with hold_run_folder(output_dir):
        return _run(cfg, output_dir)


def _run(cfg: DictConfig, output_dir: Path) -> float | None:
    overrides = task_overrides()
    if cfg.get("fit", True) and is_sweep_job():
        finished = _finished_job(output_dir, overrides, cfg)
        if finished is not None:
            return finished.get("score")
        cfg = _resume_if_interrupted(cfg, output_dir)
    if not cfg.get("fit", True) and (output_dir / CHECKPOINT_DIR).is_dir():
        # Before RunRecord, which would replace the training run's run_status.json.
        raise ConfigError(
            f"{output_dir} holds a training run (it has checkpoints/); an evaluation writes its own "
            "test_metrics.json and run_status.json and would replace that run's. Leave run_dir "
            "unset (outputs/evals/<time>) or name a new folder, and pass the run as "
            f"ckpt_path={output_dir}"
        )
    record = RunRecord(cfg, output_dir, overrides)
    try:
        check_train_config(cfg)
        if cfg.get("seed") is not None:
            L.seed_everything(cfg.seed, workers=True)
        score = (
            _fit(cfg, output_dir, record)
            if cfg.get("fit", True)
            else _evaluate(cfg, output_dir, record)
        )
    except BaseException as error:
        interrupted = isinstance(error, KeyboardInterrupt | SystemExit)
        record.end(INTERRUPTED if interrupted else FAILED, error=error)
        if interrupted and is_sweep_job():
            summarize_interrupted_job()
        if isinstance(error, SystemExit) and error.code in (None, 0):
            # Lightning stops on SIGTERM (SLURM's preemption, `kill`) with a SystemExit that has no
            # code: the process would exit 0, and SLURM, make and CI would count the run a success.
            by_sigterm = isinstance(error, SIGTERMException)
            log.error(
                "%s: the run was interrupted; %s",
                "stopped by SIGTERM" if by_sigterm else "stopped",
                # A sweep job's folder name holds '=', which a run_dir override cannot take bare.
                f"rerun the sweep with hydra.sweep.dir={output_dir.parent} to resume it"
                if is_sweep_job()
                else f"resume it with: {resume_command(overrides, output_dir)}",
            )
            raise SystemExit(128 + signal.SIGTERM if by_sigterm else 1) from error
        raise
    record.end(COMPLETED, score=score)
    return score


def _finished_job(output_dir: Path, overrides: list[str], cfg: DictConfig) -> dict[str, Any] | None:
    """The status of this sweep job if its folder records it completed (then it is skipped).

    Raises:
        ConfigError: the folder holds a job with other overrides (a sweep rerun into a folder of
            another sweep, or two jobs that would share a folder), or one trained on another data
            root (``data.root`` and ``PNEUMONIA_DATA`` do not name a job's folder).
    """
    earlier = read_status(output_dir)
    if earlier is None:
        return None
    if job_identity(list(earlier.get("overrides") or [])) != job_identity(overrides):
        raise ConfigError(
            f"{output_dir} holds a run with other overrides ({earlier.get('overrides')}) than this "
            f"job ({overrides}); rerun a sweep with its own command, or give it a new "
            "hydra.sweep.dir (search parameters of hparams_search=optuna go in its "
            "hydra.sweeper.params)"
        )
    if earlier.get("status") != COMPLETED:
        return None
    _check_same_data_root(output_dir, cfg)
    log.info(
        "%s finished before (%s = %s): skipped; delete its run_status.json to run it again",
        output_dir,
        earlier.get("optimized_metric"),
        earlier.get("score"),
    )
    return earlier


def _check_same_data_root(output_dir: Path, cfg: DictConfig) -> None:
    """Refuse to skip a finished job whose checkpoint was trained on another data root."""
    last = last_checkpoint(output_dir)
    if not last.is_file() or cfg.data.get("root") is None:
        return
    try:
        trained_on = read_hyperparameters(last).get("split", {}).get("root")
    except Exception:  # an unreadable record cannot prove anything; skip as before
        return
    current = Path(str(cfg.data.root)).expanduser()
    if trained_on is not None and Path(str(trained_on)).resolve() != current.resolve():
        raise ConfigError(
            f"{output_dir} holds a finished run trained on {trained_on}, but this sweep reads "
            f"{current}; its score is not this data's. Give this sweep its own hydra.sweep.dir"
        )


def _resume_if_interrupted(cfg: DictConfig, output_dir: Path) -> DictConfig:
    """A sweep job rerun into its folder continues from its ``last.ckpt`` (or starts afresh)."""
    last = last_checkpoint(output_dir)
    if cfg.get("ckpt_path") is not None or not last.is_file():
        return cfg
    log.info("%s was interrupted: resuming it from %s", output_dir, last)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.ckpt_path = LAST
    return cfg


def _fit(cfg: DictConfig, output_dir: Path, record: RunRecord) -> float | None:
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"), output_dir)
    resume = ResumePoint.read(ckpt_path) if ckpt_path is not None else None
    datamodule: ChestXrayDataModule = instantiate(cfg.data)
    module: XrayClassifier = instantiate(cfg.model, _recursive_=False, **model_arguments(cfg))
    if resume is not None:
        _check_resumes_the_same_model(resume, module, cfg)
    # Set the data up here, in the launching process: an empty test split fails before 15 epochs
    # of training, and the statistics reach the module even when ddp_spawn trains in workers.
    datamodule.prepare_data()
    if resume is not None:
        resume.check_same_split(datamodule.split_settings())
    datamodule.setup("fit")
    if cfg.get("test", True):
        datamodule.dataset("test")
    module.adopt_data_statistics(datamodule)
    if resume is not None:
        resume.check_same_class_weights(module.hparams.get("class_weights"))

    epochs = BestEpochMetrics(logged_metrics=(*METRIC_NAMES, "loss"))
    callbacks = _fit_callbacks(cfg, output_dir, record, epochs)
    loggers = _instantiate_all(cfg.get("logger"), Logger)
    if resume is not None and resume.is_in(output_dir):
        resume.continue_logs(loggers)  # the run's first start logged its hyperparameters
    else:
        if resume is None:
            _drop_earlier_logs(loggers)
        _log_hyperparameters(loggers, cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    record.watch(trainer, loggers, epochs)
    # A report from an earlier fit in this folder must not pass for this one's if it fails; a
    # failure before this point trained nothing and leaves it (and the run's record) as it was.
    retire_test_report(output_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    record.fit_ended()
    for logger in loggers:
        if isinstance(logger, ContinuingTensorBoardLogger | ContinuingCSVLogger):
            logger.keep_history()

    checkpoint = trainer.checkpoint_callback
    if not isinstance(checkpoint, ModelCheckpoint) or not checkpoint.best_model_path:
        checkpoint = None
    _refuse_untrained(trainer, checkpoint, resume, cfg, output_dir)
    if cfg.get("test", True):
        _refuse_unvalidated(trainer, checkpoint, output_dir)
    score = _best_score(trainer, checkpoint, cfg.optimized_metric, record.best_val())
    if cfg.get("test", True):
        report = _test_fitted(trainer, module, datamodule, checkpoint, loggers, output_dir, score)
        if cfg.optimized_metric.startswith("test/"):
            name = cfg.optimized_metric.removeprefix("test/")
            score = _as_float((report or {}).get("metrics", {}).get(name))
    if trainer.is_global_zero and measures_outside_pool(cfg, datamodule):
        best = checkpoint.best_model_path if checkpoint is not None else None
        measured = load_classifier(best)[0] if best else module
        measurements = measure_outside_pool(
            cfg, measured, datamodule, datamodule, loggers, output_dir, trainer.global_step,
            trainer.strategy.root_device,
        )  # fmt: skip
        if cfg.optimized_metric in measurements:
            score = measurements[cfg.optimized_metric]
    return score


def _check_resumes_the_same_model(
    resume: ResumePoint, module: XrayClassifier, cfg: DictConfig
) -> None:
    """Refuse a resume whose network, training steps or optimiser differ from the checkpoint's."""
    resume.check_same_model(dict(module.hparams))
    resume.check_same_training(module.hparams.get("training") or {}, cfg.trainer.get("max_epochs"))
    scheduler = to_plain(module.hparams.scheduler)
    resume.check_optimizer_state(
        list(module.parameters()),
        to_plain(module.hparams.optimizer),
        scheduled=bool(scheduler),
        cycles_momentum=cycles_momentum(scheduler),
    )
    log.info("resuming from %s (epoch %d, step %d)", resume.path, resume.epoch, resume.global_step)


def _fit_callbacks(
    cfg: DictConfig, output_dir: Path, record: RunRecord, epochs: BestEpochMetrics
) -> list[Callback]:
    """The config's callbacks, and those every fit needs: divergence checks, the random stream
    in checkpoints, the best epoch's metrics, the test report and the run's status."""
    callbacks = [
        *_instantiate_all(cfg.get("callbacks"), Callback),
        StopOnDivergence(check_every_n_steps=cfg.trainer.get("log_every_n_steps") or 50),
        RandomStreamCheckpoint(),
        epochs,
        TestReportWriter(output_dir),
        *([StatusProgress(record.status)] if record.status is not None else []),
    ]
    if cfg.trainer.get("enable_progress_bar", True) and not any(
        isinstance(c, ProgressBar) for c in callbacks
    ):
        callbacks.append(StepProgressBar())
    return callbacks


def _test_fitted(
    trainer: L.Trainer,
    module: XrayClassifier,
    datamodule: ChestXrayDataModule,
    checkpoint: ModelCheckpoint | None,
    loggers: list[Logger],
    output_dir: Path,
    best_val_score: float | None,
) -> dict[str, Any] | None:
    """Test the best checkpoint (else the final weights, saying which) and print the report."""
    best = checkpoint.best_model_path if checkpoint is not None else None
    if best is None:
        weights = (
            f"the weights after {trainer.global_step} training step(s) of a fast_dev_run: a "
            "smoke test, not a result"
            if trainer.fast_dev_run
            else f"the final weights after {trainer.global_step} training step(s); no "
            "checkpoint was saved"
        )
        log.warning("no best checkpoint was saved; testing %s", weights)
    elif checkpoint.monitor is None:
        weights = f"the final weights, after {trainer.current_epoch} epoch(s)"
    else:
        weights = f"the best checkpoint by {checkpoint.monitor}"
    for logger in loggers:
        if isinstance(logger, ContinuingTensorBoardLogger):
            logger.step_floor = _fitted_step(trainer)
    # verbose=False: the report's own table is printed below, once.
    trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True, verbose=False)
    extra = {"best_val_score": best_val_score, "weights": weights}
    return _print_report(trainer, output_dir, extra)


# Top-level config entries that XrayClassifier takes besides cfg.model (its argument names).
MODEL_ARGUMENTS = (
    "optimizer", "scheduler", "augmentation", "normalization", "operating_point", "label_smoothing",
)  # fmt: skip


def model_arguments(cfg: DictConfig) -> dict[str, Any]:
    """What the model is built with besides ``cfg.model``: optimiser, schedule, the recipe groups
    and how the steps are taken."""
    arguments = {key: cfg.get(key) for key in MODEL_ARGUMENTS}
    arguments["label_smoothing"] = cfg.get("label_smoothing", 0.0)
    arguments["training"] = training_settings(cfg)
    return arguments


def training_settings(cfg: DictConfig) -> dict[str, Any]:
    """How the training steps are taken: a resume must take them the same way, or the run's
    record (and the checkpoint) would claim settings its earlier epochs did not use."""
    trainer = cfg.get("trainer") or {}
    return step_settings(
        OmegaConf.select(cfg, "data.batch_size"),
        trainer.get("precision"),
        trainer.get("accumulate_grad_batches"),
        trainer.get("gradient_clip_val"),
        trainer.get("gradient_clip_algorithm"),
    )


def _fitted_step(trainer: L.Trainer) -> int:
    """The global step fitting ended at (ddp_spawn's launching trainer only knows it from disk)."""
    if trainer.global_step > 0:
        return trainer.global_step
    return int((fitted_last_checkpoint(trainer) or {}).get("global_step", 0))


def _refuse_unvalidated(
    trainer: L.Trainer, checkpoint: ModelCheckpoint | None, output_dir: Path
) -> None:
    """Raise NeverValidatedError when a fit that tests never validated (settings that
    :func:`~pneumonia.config.check_train_config` cannot foresee, such as ``max_steps`` ending the
    fit before the first validation epoch)."""
    validated = any(str(key).startswith("val/") for key in trainer.callback_metrics) or (
        checkpoint is not None and checkpoint.monitor is not None  # in an earlier attempt
    )
    if not validated and not trainer.fast_dev_run:
        raise NeverValidatedError(
            f"the fit ended after {trainer.global_step} training step(s) without a validation, "
            f"{NEVER_VALIDATED}. No test metrics are reported; the trained weights are in "
            f"{output_dir / CHECKPOINT_DIR}"
        )


def _refuse_untrained(
    trainer: L.Trainer,
    checkpoint: ModelCheckpoint | None,
    resume: ResumePoint | None,
    cfg: DictConfig,
    output_dir: Path,
) -> None:
    """Raise NothingTrainedError when this fit trained nothing whose test could be a result."""
    # ddp_spawn trains in workers: the launching trainer sees their checkpoint and metrics only.
    trained = (
        trainer.global_step > 0
        or checkpoint is not None
        or "train/loss_epoch" in trainer.callback_metrics
    )
    if not trained:
        raise NothingTrainedError(
            f"the fit took no training step (trainer.max_epochs={cfg.trainer.get('max_epochs')}, "
            f"trainer.limit_train_batches={cfg.trainer.get('limit_train_batches', 1.0)}), so there "
            "is no trained model and no test metrics are reported. Train for at least one epoch, "
            "or evaluate an existing checkpoint: python train.py --config-name eval ckpt_path=..."
        )
    if (
        resume is not None
        and not resume.is_in(output_dir)
        and trainer.global_step == resume.global_step
    ):
        stopper = trainer.early_stopping_callback
        if stopper is not None and stopper.stopping_reason != EarlyStoppingReason.NOT_STOPPED:
            raise NothingTrainedError(
                f"{resume.path} stopped early after epoch {stopper.stopped_epoch} "
                f"({stopper.stopping_reason_message or stopper.stopping_reason.name}), so this "
                "run trained nothing and reports no test metrics; evaluate it (python train.py "
                "--config-name eval ckpt_path=...) or start a new run"
            )
        raise NothingTrainedError(
            f"{resume.path} was already trained for trainer.max_epochs="
            f"{cfg.trainer.get('max_epochs')}, so this run trained nothing and reports no test "
            "metrics; raise trainer.max_epochs to train on, or evaluate it: python train.py "
            "--config-name eval ckpt_path=..."
        )


def _best_score(
    trainer: L.Trainer,
    checkpoint: ModelCheckpoint | None,
    metric: str,
    best_val: Mapping[str, float],
) -> float | None:
    """The sweeper's score: ``metric`` for the weights the run keeps and tests.

    The best checkpoint's score when the checkpoint monitors ``metric``; for another validation
    metric, its value at the best checkpoint's epoch (``best_val``, the run's ``val_best/``
    record), not at the last epoch; without a checkpoint, the last value (the final weights are
    the tested ones).
    """
    if checkpoint is not None and checkpoint.monitor == metric:
        # ddp_spawn sends back the best path but not the score; the checkpoint file records it.
        score = _as_float(checkpoint.best_model_score)
        return score if score is not None else recorded_score(checkpoint.best_model_path)
    if checkpoint is not None and metric.startswith("val/") and best_val:
        return _as_float(best_val.get(metric))  # None where it was NaN at that epoch
    return _as_float(trainer.callback_metrics.get(metric))


def _evaluate(cfg: DictConfig, output_dir: Path, record: RunRecord) -> float | None:
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"), output_dir, prefer_best=True)
    if ckpt_path is None:
        raise CheckpointError(
            "evaluation needs a checkpoint: pass ckpt_path=<file.ckpt or run folder>"
        )
    module, hparams = load_classifier(ckpt_path)
    image_size = int(hparams["image_size"])
    if cfg.get("checkpoint_split"):
        datamodule = checkpoint_data(
            cfg, hparams, ckpt_path, cfg.data.get("root"), image_size=image_size
        )
        log.info("evaluating %s on the test split it was trained with", ckpt_path)
    else:
        datamodule = instantiate(cfg.data, image_size=image_size)
        log.info(
            "evaluating %s (trained at %dpx) on every image of %s",
            ckpt_path,
            image_size,
            datamodule.root,
        )
    loggers = _instantiate_all(cfg.get("logger"), Logger)
    callbacks = [TestReportWriter(output_dir)]
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    record.watch(trainer, loggers, None)
    trainer.test(module, datamodule=datamodule, verbose=False)
    extra: dict[str, Any] = {"checkpoint": str(ckpt_path), "data_root": str(datamodule.root)}
    pool = None
    if cfg.get("checkpoint_split"):
        pool = datamodule
    elif trainer.is_global_zero:
        pool = training_pool(cfg, hparams, ckpt_path, image_size)
        extra["copies_of_training_images"] = copies_of_training_images(pool, datamodule)
    report = _print_report(trainer, output_dir, extra)
    if report:
        warn_if_one_class(f"the evaluated set {datamodule.root}", report["confusion_matrix"])
    score = report["metrics"]["balanced_accuracy"] if report else None
    if trainer.is_global_zero and measures_outside_pool(cfg, datamodule):
        measurements = measure_outside_pool(
            cfg, module, datamodule, pool, loggers, output_dir, 0, trainer.strategy.root_device,
        )  # fmt: skip
        score = measurements.get(cfg.optimized_metric, score)
    return score


def _print_report(
    trainer: L.Trainer, output_dir: Path, extra: dict[str, Any]
) -> dict[str, Any] | None:
    """Add what only the launching process knows to the report the test wrote, and print it."""
    if not trainer.is_global_zero:
        return None
    report = add_to_test_report(output_dir, extra)
    print("\n" + format_metrics_table(report["metrics"]) + "\n")
    print(f"run folder: {output_dir}\ntest metrics: {output_dir / 'test_metrics.json'}")
    return report


def _instantiate_all(group: DictConfig | None, kind: type) -> list:
    """Instantiate every entry of a config group that is a dict of named objects (callbacks, loggers)."""
    objects = []
    for name, node in (group or {}).items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        obj = instantiate(node)
        if not isinstance(obj, kind):
            raise TypeError(
                f"config entry {name!r} built a {type(obj).__name__}, expected a {kind.__name__}"
            )
        objects.append(obj)
    return objects


def _drop_earlier_logs(loggers: list[Logger]) -> None:
    """A run starting afresh in a used folder (a rerun sweep job) must not continue its curves."""
    used = [lg for lg in loggers if Path(lg.log_dir).is_dir() and any(Path(lg.log_dir).iterdir())]
    continue_logs(used, -1)


def _log_hyperparameters(loggers: list[Logger], cfg: DictConfig) -> None:
    """Save the run's settings in each logger's hparams.yaml.

    TensorBoard's HPARAMS session is written when the run ends (:mod:`hparams_session`), so no
    metric gets a placeholder value here.
    """
    params = {
        key: to_plain(cfg[key])
        for key in (
            "model",
            *MODEL_ARGUMENTS,
            "class_weighting",
            "data",
            "trainer",
            "image_size",
            "seed",
        )
        if key in cfg
    }
    params["data"] = {
        k: v for k, v in params.get("data", {}).items() if f"data.{k}" not in NOT_HYPERPARAMETERS
    }
    for logger in loggers:
        logger.log_hyperparams(params)


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value
