"""What a composed config must satisfy before anything runs.

The entry points call :func:`check_train_config` / :func:`check_explain_config` first, so a config
whose values contradict each other fails in a second, naming both values, instead of halfway
through a run (a matrix shape error in the first batch, a ``None`` handed to the sweeper).
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pneumonia import check_image_size, is_whole_number
from pneumonia.devices import resolve_device
from pneumonia.errors import ConfigError
from pneumonia.explain.settings import (
    METHODS,
    SIGNS,
    check_batch_size,
    check_interpolate_mode,
    check_layer,
    check_target,
)
from pneumonia.hydra_hooks import override_key
from pneumonia.metrics.diagnostic import METRIC_NAMES
from pneumonia.metrics.evaluation import external_metric_names
from pneumonia.training.checkpoints import CHECKPOINT_DIR, LAST

log = logging.getLogger(__name__)

OPTIMIZABLE_METRICS: tuple[str, ...] = tuple(
    f"{stage}/{name}" for stage in ("val", "test") for name in (*METRIC_NAMES, "loss")
)


def optimizable_metrics(cfg: DictConfig) -> tuple[str, ...]:
    """The metrics a run with this config produces and a sweep may optimise."""
    external = OmegaConf.select(cfg, "data.external_tests") or {}
    names = external_metric_names(external)
    if OmegaConf.select(cfg, "shift_suite.enabled"):
        names.append("shift/robustness")
    return (*OPTIMIZABLE_METRICS, *names)


def check_added_keys(cfg: DictConfig, overrides: list[str], groups: Iterable[str] = ()) -> None:
    """Refuse a ``+key=value`` that adds a top-level setting nothing reads.

    Hydra's hint for a misspelt key is to append it with ``+``, and ``+optimiser.lr=0.1`` then
    trained at the default learning rate without a word. A ``+`` below an existing setting
    (``+trainer.val_check_interval=0.5``, ``+data.external_tests.site=<folder>``) is left to the
    object it configures, which refuses what it does not take; ``++`` is never refused.

    Raises:
        ConfigError: naming the override and the closest existing setting.
    """
    added = [override_key(o) for o in overrides if o.startswith("+") and not o.startswith("++")]
    if not added:
        return
    plain = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(plain, dict)
    interpolations = " ".join(re.findall(r"\$\{[^}]*\}", OmegaConf.to_yaml(cfg)))
    for top in dict.fromkeys(key.split(".")[0] for key in added):
        if top in groups or top not in plain:
            continue
        leaves = _leaf_keys(plain[top], top)
        if not all(any(leaf == k or leaf.startswith(f"{k}.") for k in added) for leaf in leaves):
            continue  # the config defines part of it: an existing setting
        if re.search(rf"(?<![\w.]){re.escape(top)}\b", interpolations):
            continue  # read by an interpolation: +base_lr=0.002 'optimizer.lr=${base_lr}'
        known = [str(k) for k in plain if not any(a.split(".")[0] == k for a in added)]
        close = difflib.get_close_matches(top, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        override = next(o for o in overrides if override_key(o).split(".")[0] == top)
        raise ConfigError(
            f"{override} adds '{top}', which is not a setting of this config{hint}, so nothing "
            "would read it. Drop the '+' to change an existing setting; --cfg job prints them all"
        )


def _leaf_keys(node: object, prefix: str) -> list[str]:
    if not isinstance(node, dict) or not node:
        return [prefix]
    return [leaf for key, value in node.items() for leaf in _leaf_keys(value, f"{prefix}.{key}")]


def check_train_config(cfg: DictConfig) -> None:
    """Refuse a train/eval config whose parts disagree.

    Raises:
        ConfigError: naming the setting, when the image sizes of data and network differ or leave
            32..1024; ``optimized_metric`` is not a metric the run produces, or a ``test/`` one
            with ``test=false``; the test would run on no batch; a fit that tests would never
            validate; the operating point or the shift suite is set wrongly, or ``model.threshold``
            would be replaced by the operating point.
    """
    if cfg.get("fit", True):
        sizes = {
            key: OmegaConf.select(cfg, key)
            for key in ("image_size", "data.image_size", "model.image_size", "model.net.image_size")
        }
        sizes = {key: value for key, value in sizes.items() if value is not None}
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{key}={value}" for key, value in sizes.items())
            raise ConfigError(
                f"the data and the network disagree on the image size ({listed}); set the top-level "
                "image_size=<side> to change them together"
            )
        for key, value in sizes.items():
            try:
                check_image_size(value, key)
            except ValueError as err:
                raise ConfigError(str(err)) from err
    metric = cfg.get("optimized_metric")
    if metric is not None:
        produced = optimizable_metrics(cfg)
        if metric not in produced:
            raise ConfigError(
                f"optimized_metric={metric!r} is not a metric this run produces; choose one of "
                f"{', '.join(produced)} (shift/robustness needs shift_suite.enabled=true, "
                "external/<name>/<metric> a data.external_tests entry <name>)"
            )
        if metric.startswith("test/") and not cfg.get("test", True) and cfg.get("fit", True):
            raise ConfigError(
                f"optimized_metric={metric} needs the test split, but test=false; set test=true "
                "or optimise a val/ metric"
            )
    tests = cfg.get("test", True) or not cfg.get("fit", True)
    if tests and OmegaConf.select(cfg, "trainer.limit_test_batches") in (0, 0.0):
        raise ConfigError(
            "trainer.limit_test_batches=0 tests on no image, but this run tests; set test=false "
            "to skip testing, or give it a number of batches (or a share, up to 1.0)"
        )
    if cfg.get("fit", True) and cfg.get("test", True):
        _check_validates(cfg)
    if cfg.get("fit", True):
        _check_checkpoint_folder(cfg)
    _check_recipe_groups(cfg)


def _check_checkpoint_folder(cfg: DictConfig) -> None:
    """The run's own checkpoints (``callbacks.model_checkpoint``) belong in ``<run_dir>/checkpoints``,
    where a resume (``ckpt_path=last``), an evaluation of the run folder and a sweep rerun look:
    saved anywhere else they would not be found, and a rerun would start the job again. Other
    checkpoint callbacks may save where they like."""
    expected = Path(OmegaConf.select(cfg, "paths.output_dir")) / CHECKPOINT_DIR
    node = OmegaConf.select(cfg, "callbacks.model_checkpoint")
    if node is None:
        if OmegaConf.select(cfg, "trainer.enable_checkpointing") is not False:
            log.warning(
                "callbacks has no model_checkpoint: Lightning's default checkpoint goes under the "
                "logger's folder, not %s, so this run cannot be resumed with ckpt_path=last nor "
                "by rerunning its sweep",
                expected,
            )
        return
    dirpath = node.get("dirpath")
    if dirpath is None or Path(str(dirpath)).resolve() != expected.resolve():
        raise ConfigError(
            f"callbacks.model_checkpoint.dirpath={dirpath}: the run's checkpoints belong in "
            f"{expected}, where a resume, an evaluation and a sweep rerun look for them. Leave "
            "dirpath as it is and choose the run's folder with run_dir=<folder>; add another "
            "ModelCheckpoint under callbacks for copies elsewhere"
        )
    filename = str(node.get("filename") or "")
    fields = re.findall(r"{([^}:]*)", filename)
    literal = re.sub(r"{[^}]*}", "", filename)
    # Lightning writes "<metric>=" before each field unless told not to, and metrics hold "/".
    inserted = node.get("auto_insert_metric_name", True) and any("/" in f for f in fields)
    if "/" in literal or inserted:
        raise ConfigError(
            f"callbacks.model_checkpoint.filename={filename!r} makes checkpoint names with '/', "
            f"which Lightning saves in folders below {expected}, where a resume, an evaluation and "
            "the choice of the best checkpoint do not look. Use a name without '/' (a metric's "
            "'/' is fine with callbacks.model_checkpoint.auto_insert_metric_name=false)"
        )


# Why a fit that tests must validate; said before it starts, and after it if it did not.
NEVER_VALIDATED = (
    "but this run tests: the checkpoint it tests is the best by validation, and the temperature "
    "and the decision threshold are fitted on validation. Validate at least once, or set "
    "test=false to train without a test report"
)


def _check_validates(cfg: DictConfig) -> None:
    """Refuse a fit that tests but never validates: the weights tested are chosen on validation
    (the best checkpoint), and the temperature and the decision threshold are fitted on it, so its
    report would test the last weights at the untrained operating point without a word."""
    if OmegaConf.select(cfg, "trainer.fast_dev_run") or OmegaConf.select(
        cfg, "trainer.overfit_batches"
    ):
        return  # Lightning validates on batches of its own choosing then
    never = None
    limit = OmegaConf.select(cfg, "trainer.limit_val_batches")
    if limit in (0, 0.0):
        never = f"trainer.limit_val_batches={limit} validates on no image"
    every = OmegaConf.select(cfg, "trainer.check_val_every_n_epoch")
    epochs = OmegaConf.select(cfg, "trainer.max_epochs")
    if is_whole_number(every) and is_whole_number(epochs) and 1 <= epochs < every:
        never = (
            f"trainer.check_val_every_n_epoch={every} validates after none of the "
            f"trainer.max_epochs={epochs} epochs"
        )
    if never:
        raise ConfigError(f"{never}, {NEVER_VALIDATED}")


def check_threshold_override(key: str, threshold: object) -> None:
    """Refuse a threshold that is neither null (the checkpoint's stored one) nor in [0, 1]."""
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not 0.0 <= threshold <= 1.0  # False for NaN too
    ):
        raise ConfigError(
            f"{key}={threshold!r} must be a probability in [0, 1] (P(PNEUMONIA) at or above it "
            "is called PNEUMONIA), or null for the checkpoint's stored threshold"
        )


def _check_recipe_groups(cfg: DictConfig) -> None:
    """The threshold rule and the shift suite's settings, which would otherwise fail after training
    or be silently replaced."""
    from pneumonia.metrics import operating_point  # noqa: F401  (registers the rules)
    from pneumonia.metrics.shift import PERTURBATIONS, SEVERITIES
    from pneumonia.model import registry

    node = cfg.get("operating_point")
    if node and cfg.get("fit", True):
        try:
            rule = registry.build("operating_point", OmegaConf.to_container(node, resolve=True))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"operating_point: {err}") from err
        threshold = (cfg.get("model") or {}).get("threshold")
        if threshold is not None:
            raise ConfigError(
                f"model.threshold={threshold} would be replaced after the first validation by the "
                f"operating point ({rule.describe()}); for a fixed threshold use "
                f"operating_point=fixed operating_point.threshold={threshold}"
            )
    suite = cfg.get("shift_suite") or {}
    if suite.get("enabled"):
        unknown = [p for p in suite.get("perturbations") or () if p not in PERTURBATIONS]
        if unknown:
            raise ConfigError(
                f"shift_suite.perturbations: {unknown} unknown; choose from {list(PERTURBATIONS)}"
            )
        check_threshold_override("shift_suite.threshold", suite.get("threshold"))
        severities = suite.get("severities")
        if severities is not None and (
            not severities or any(s not in SEVERITIES for s in severities)
        ):
            raise ConfigError(
                f"shift_suite.severities={list(severities)}: use some of {list(SEVERITIES)}"
            )


def check_ckpt_path(cfg: DictConfig) -> None:
    """Refuse a missing ``ckpt_path``, or ``last`` (train.py's resume), in explain or predict."""
    checkpoint = "ckpt_path=<file.ckpt> or ckpt_path=<a run folder> (its best checkpoint)"
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.get("ckpt_path") in (None, ""):
        raise ConfigError(f"ckpt_path is required; {checkpoint}")
    if str(cfg.ckpt_path) == LAST:
        raise ConfigError(f"ckpt_path=last resumes training in train.py; pass {checkpoint}")


def check_explain_config(cfg: DictConfig) -> None:
    """Refuse an explain config naming unknown methods, signs or targets, before any attribution.

    Raises:
        ConfigError: naming the value and the choices.
    """
    check_ckpt_path(cfg)
    chosen = list(cfg.methods or [])
    if not chosen:
        raise ConfigError(f"methods is empty; choose one or more of {list(METHODS)}")
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise ConfigError(f"methods={chosen}: unknown {unknown}; choose from {list(METHODS)}")
    if cfg.figure_method not in chosen:
        raise ConfigError(
            f"figure_method={cfg.figure_method!r} is not among methods={chosen}; add it to methods "
            "or pick one of them"
        )
    bad_signs = [s for s in (cfg.signs or []) if s not in SIGNS]
    if bad_signs or not cfg.signs:
        raise ConfigError(f"signs={list(cfg.signs or [])}: choose one or more of {list(SIGNS)}")
    # The attribution settings shared with the training callback: AttributionSettings' checks.
    check_target(cfg.target)
    check_layer(cfg.layer)
    check_interpolate_mode(cfg.interpolate_mode)
    check_batch_size(cfg.batch_size)
    if cfg.get("max_images") is not None and (
        not is_whole_number(cfg.max_images) or cfg.max_images < 1
    ):
        raise ConfigError(
            f"max_images={cfg.max_images!r} must be a whole number of at least 1, or null for "
            "every image"
        )
    for key in ("trust.images", "trust.deletion_steps"):
        value = OmegaConf.select(cfg, key)
        if not is_whole_number(value) or value < 1:
            raise ConfigError(f"{key}={value!r} must be a whole number of at least 1")
    resolve_device(cfg.device)
