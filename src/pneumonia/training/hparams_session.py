"""TensorBoard's HPARAMS tab, written once a run has ended, so it shows what happened.

Lightning logs hyperparameters when a run starts, with metric placeholders (a fake 0.0 at step 0 in
every curve) and every flattened config entry as a column. Here the session is written when the
run ends instead, into its own event file beside the run's scalars:

- the columns are the run's recipe (the chosen option of each config group), the values it
  overrode, and ``status`` (``completed``, ``failed``, ``interrupted``); the session's end status
  is TensorBoard's success or failure, so the tab's status filter hides or shows failed runs;
- the metric columns are the run's own scalars, read by TensorBoard: the last validation epoch
  (``val/``), the epoch of the tested weights (``val_best/``), the test split (``test/``), the
  external sets, the shift suite, and the training curves' last values. A run that failed before
  testing shows empty test columns, not zeros;
- a rerun or resumed run replaces its earlier session file, so the tab holds one row per run.

No session carries an experiment record (the list of columns). TensorBoard takes the columns of
the first record it finds for the whole logdir, so with several sweeps under one logdir the
hyperparameters and external sets of all but one sweep would vanish from the tab
(tensorflow/tensorboard#5596). Without one, TensorBoard builds the columns from every session's
hyperparameters and every session's scalars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pneumonia.hydra_hooks import override_key
from pneumonia.training.status import COMPLETED, FAILED

SESSION_SUFFIX = ".hparams"
RECIPE_GROUPS = (
    "model", "optimizer", "scheduler", "class_weighting", "augmentation", "normalization",
    "operating_point", "experiment",
)  # fmt: skip
# Overrides that say where a run reads or writes or how it reports, not what it is: every key of
# hydra.job.config.override_dirname.exclude_keys, and the split file a run reads.
NOT_HYPERPARAMETERS = (
    "run_dir", "ckpt_path", "data.root", "data.cache_dir", "data.split_csv", "hparams_search",
    "optuna_trials",
)  # fmt: skip
NOT_HYPERPARAMETER_PREFIXES = (
    "hydra", "paths.", "callbacks", "logger", "trainer.enable_", "trainer.log_every_n_steps",
)  # fmt: skip


def session_hparams(
    cfg: DictConfig, choices: dict[str, Any], overrides: list[str], status: str
) -> dict[str, str | float | bool]:
    """The HPARAMS columns of a run: its recipe, its overrides and its status.

    Args:
        choices: the option chosen per config group (Hydra's ``runtime.choices``; may be empty).
        overrides: the run's task overrides (``key=value``).
    """
    params: dict[str, str | float | bool] = {}
    for group in RECIPE_GROUPS:
        choice = choices.get(group)
        if choice is None and isinstance(cfg.get(group), DictConfig):
            target = cfg[group].get("_target_")
            choice = str(target).rsplit(".", 1)[-1] if target else None
        if choice is not None or group != "experiment":
            params[group] = str(choice) if choice is not None else "none"
    for key, value in (
        ("optimizer.lr", (cfg.get("optimizer") or {}).get("lr")),
        ("image_size", cfg.get("image_size")),
        ("seed", cfg.get("seed")),
        ("label_smoothing", cfg.get("label_smoothing")),
        ("data.batch_size", (cfg.get("data") or {}).get("batch_size")),
        ("trainer.max_epochs", (cfg.get("trainer") or {}).get("max_epochs")),
    ):
        if value is not None:
            params[key] = _value(value)
    for override in overrides:
        _, sep, value = override.partition("=")
        key = override_key(override)
        if (
            sep
            and key not in NOT_HYPERPARAMETERS
            and not key.startswith(NOT_HYPERPARAMETER_PREFIXES)
        ):
            params[key] = _value(value)
    params["status"] = status
    return params


def write_session(log_dir: str | Path, hparams: dict[str, Any], status: str) -> Path:
    """Write the run's HPARAMS session into ``log_dir``, replacing an earlier one; its file."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from torch.utils.tensorboard.writer import FileWriter

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    for earlier in log_dir.glob(f"events.out.tfevents.*{SESSION_SUFFIX}"):
        earlier.unlink()
    start = plugin_data_pb2.SessionStartInfo()
    for name, value in hparams.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
        elif isinstance(value, int | float):
            start.hparams[name].number_value = float(value)
        else:
            start.hparams[name].string_value = str(value)
    end_status = {COMPLETED: api_pb2.STATUS_SUCCESS, FAILED: api_pb2.STATUS_FAILURE}
    end = plugin_data_pb2.SessionEndInfo(status=end_status.get(status, api_pb2.STATUS_UNKNOWN))
    writer = FileWriter(str(log_dir), filename_suffix=SESSION_SUFFIX)
    try:
        writer.add_summary(_summary(metadata.SESSION_START_INFO_TAG, session_start_info=start))
        writer.add_summary(_summary(metadata.SESSION_END_INFO_TAG, session_end_info=end))
    finally:
        writer.close()
    return Path(writer.get_logdir())


def _summary(tag: str, **content: Any) -> Any:
    """A summary carrying one piece of HParams plugin data (what TensorBoard's reader expects)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **content)
    plugin = SummaryMetadata.PluginData(
        plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString()
    )
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])


def _value(value: Any) -> str | float | bool:
    """A number stays a number (TensorBoard can sort and plot it); anything else is text."""
    if isinstance(value, bool | int | float):
        return value
    text = str(value)
    try:
        return float(text)
    except ValueError:
        return text
