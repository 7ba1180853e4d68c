"""A config whose parts disagree is refused before anything runs, naming the values."""

from __future__ import annotations

import pytest

from pneumonia.config import (
    OPTIMIZABLE_METRICS,
    check_added_keys,
    check_explain_config,
    check_train_config,
)
from pneumonia.errors import ConfigError


@pytest.mark.parametrize(
    "override, message",
    [("+optimiser.lr=0.1", r"adds 'optimiser', .* \(did you mean optimizer\?\)"),
     ("+notes=baseline", r"\+notes=baseline adds 'notes', which is not a setting"),
     ("+optimiser={lr: 0.1}", "adds 'optimiser'")],
)  # fmt: skip
def test_a_plus_that_adds_a_top_level_setting_nothing_reads_is_refused(
    compose_config, override, message
):
    cfg = compose_config(override)
    with pytest.raises(ConfigError, match=message):
        check_added_keys(cfg, [override])


def test_an_added_key_that_an_interpolation_reads_is_a_setting(compose_config):
    overrides = ["+base_lr=0.002", "optimizer.lr=${base_lr}"]
    cfg = compose_config(*overrides)
    check_added_keys(cfg, overrides)
    assert cfg.optimizer.lr == 0.002


@pytest.mark.parametrize(
    "override",
    ["+trainer.val_check_interval=0.5", "+data.external_tests.site_b=/data/site_b",
     "++notes=baseline", "optimizer.lr=0.1", "+callbacks.extra.x=1"],
)  # fmt: skip
def test_a_plus_below_an_existing_setting_or_a_group_is_left_to_what_reads_it(
    compose_config, override
):
    check_added_keys(compose_config(override), [override], groups=["optimizer"])


@pytest.mark.parametrize(
    "override", ["data.image_size=64", "model.image_size=64", "model.net.image_size=64"]
)
def test_an_image_size_mismatch_is_refused_naming_both_values(compose_config, override):
    cfg = compose_config(override)
    with pytest.raises(ConfigError) as raised:
        check_train_config(cfg)
    assert override in str(raised.value) and "image_size=128," in str(raised.value)


@pytest.mark.parametrize(
    "size, message",
    [(16, "image_size=16 is outside the supported sizes 32..1024"),
     (5000, "image_size=5000 is outside"), ("abc", "image_size='abc' must be a whole number"),
     (64.5, "image_size=64.5 must be a whole number")],
)  # fmt: skip
def test_an_image_size_outside_the_supported_range_is_refused_before_building(
    compose_config, size, message
):
    with pytest.raises(ConfigError, match=message):
        check_train_config(compose_config(f"image_size={size}"))


def test_one_image_size_for_everything_passes(compose_config):
    check_train_config(compose_config("image_size=64"))


def test_evaluation_takes_the_size_from_the_checkpoint(compose_config):
    check_train_config(compose_config("ckpt_path=x.ckpt", "data.image_size=64", config_name="eval"))


@pytest.mark.parametrize("metric", ["val/balanced_acc", "balanced_accuracy", "val/loss_epoch", ""])
def test_an_unknown_optimized_metric_is_refused(compose_config, metric):
    with pytest.raises(ConfigError, match=f"optimized_metric='{metric}' is not a metric"):
        check_train_config(compose_config(f"optimized_metric='{metric}'"))


def test_every_optimizable_metric_is_one_the_module_computes():
    import torch

    from pneumonia.metrics.diagnostic import DiagnosticMetrics

    metrics = DiagnosticMetrics(0.5)
    metrics.update(torch.tensor([0.2, 0.9, 0.6]), torch.tensor([0.0, 1.0, 0.0]))
    computed = [*metrics.compute(), "loss"]  # the module logs <stage>/<each> and <stage>/loss
    assert set(OPTIMIZABLE_METRICS) == {f"{s}/{name}" for s in ("val", "test") for name in computed}


def test_a_test_metric_needs_the_test(compose_config):
    with pytest.raises(ConfigError, match="needs the test split, but test=false"):
        check_train_config(compose_config("optimized_metric=test/auroc", "test=false"))


def test_testing_on_no_batch_is_refused_unless_the_run_does_not_test(compose_config):
    # It ended in a KeyError after training, leaving a test_metrics.json without metrics.
    with pytest.raises(ConfigError, match="limit_test_batches=0 tests on no image"):
        check_train_config(compose_config("+trainer.limit_test_batches=0"))
    with pytest.raises(ConfigError, match="limit_test_batches=0"):
        check_train_config(
            compose_config(
                "+trainer.limit_test_batches=0.0", "ckpt_path=x.ckpt", config_name="eval"
            )
        )
    check_train_config(compose_config("+trainer.limit_test_batches=0", "test=false"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+trainer.limit_val_batches=0"], r"limit_val_batches=0(\.0)? validates on no image"),
        (["+trainer.limit_val_batches=0.0"], r"limit_val_batches=0(\.0)? validates on no image"),
        (
            ["trainer.check_val_every_n_epoch=5", "trainer.max_epochs=4"],
            "check_val_every_n_epoch=5 validates after none of the trainer.max_epochs=4",
        ),
    ],
)
def test_a_fit_that_tests_but_never_validates_is_refused(compose_config, overrides, message):
    # It tested the last weights at the untrained threshold and temperature, and reported no score.
    with pytest.raises(ConfigError, match=message):
        check_train_config(compose_config(*overrides))
    check_train_config(compose_config(*overrides, "test=false"))


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.check_val_every_n_epoch=5", "trainer.max_epochs=5"],
        # Lightning validates on a batch of its own then, whatever the limits say.
        ["debug=fdr", "+trainer.limit_val_batches=0"],
        ["debug=overfit", "+trainer.limit_val_batches=0"],
    ],
)
def test_a_fit_that_validates_passes(compose_config, overrides):
    check_train_config(compose_config(*overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["figure_method=saliency", "methods=[gradcam]"], "figure_method='saliency' is not among"),
        (["methods=[gradcam,lime]"], r"unknown \['lime'\]"),
        (["methods=[]"], "methods is empty"),
        (["signs=[all,upside_down]"], "signs="),
        (["target=COVID"], "target='COVID' must be one of"),
        (["interpolate_mode=bogus"], "interpolate_mode='bogus' must be one of"),
        (["batch_size=0"], "batch_size=0 must be a whole number of at least 1"),
        (["trust.images=0"], "trust.images=0 must be"),
        (["max_images=0"], "max_images=0 must be a whole number of at least 1, or null"),
        (["max_images=-2"], "max_images=-2 must be"),
        (["max_images=2.5"], "max_images=2.5 must be"),
        (["max_images=abc"], "max_images='abc' must be"),
        (["trust.deletion_steps=0"], "trust.deletion_steps=0 must be"),
        (["device=cuda"], "device=cuda but this machine has no CUDA GPU"),
        (["device=tpu"], "device='tpu' must be one of auto, cpu, cuda, cuda:<index>"),
        (["ckpt_path=last"], "ckpt_path=last resumes training in train.py"),
        (["ckpt_path=''"], "ckpt_path is required"),
        (["ckpt_path=null"], "ckpt_path is required"),
    ],
)
def test_explain_settings_are_checked_before_attribution(compose_config, overrides, message):
    cfg = compose_config("ckpt_path=x.ckpt", *overrides, config_name="explain")
    with pytest.raises(ConfigError, match=message):
        check_explain_config(cfg)


@pytest.mark.parametrize("device", ["auto", "cpu", "CPU"])
def test_explain_takes_the_devices_predict_takes(compose_config, device):
    cfg = compose_config("ckpt_path=x.ckpt", f"device={device}", config_name="explain")
    check_explain_config(cfg)


def test_explain_py_refuses_a_figure_method_before_loading_anything(compose_config, tmp_path):
    from pneumonia.explain.run import explain_checkpoint

    # The checkpoint does not exist: the config check must come first.
    cfg = compose_config(
        f"ckpt_path={tmp_path / 'missing.ckpt'}", "methods=[gradcam]", config_name="explain"
    )
    with pytest.raises(ConfigError, match="figure_method='guided_gradcam'"):
        explain_checkpoint(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("operating_point=sensitivity", "operating_point.sensitivity=0"), "operating_point: .*sensitivity"),
        (("+model.threshold=0.3",), r"model.threshold=0.3 would be replaced .* operating_point=fixed operating_point.threshold=0.3"),
        (("operating_point=sensitivity", "+model.threshold=0.3"), r"model.threshold=0.3 .*sensitivity >= 0.95"),
        (("shift_suite.enabled=true", "shift_suite.perturbations=[contrast,blurr]"), r"\['blurr'\] unknown"),
        (("shift_suite.enabled=true", "shift_suite.severities=[1,4]"), r"severities=\[1, 4\]"),
        (("shift_suite.enabled=true", "shift_suite.severities=[]"), r"severities=\[\]"),
        (("shift_suite.enabled=true", "shift_suite.threshold=1.5"), r"threshold=1.5 must be"),
    ],
)  # fmt: skip
def test_recipe_settings_that_would_fail_after_training_are_refused_first(
    compose_config, overrides, message
):
    with pytest.raises(ConfigError, match=message):
        check_train_config(compose_config(*overrides))


def test_the_runs_own_checkpoints_must_stay_in_its_checkpoints_folder(compose_config, tmp_path):
    cfg = compose_config(f"callbacks.model_checkpoint.dirpath={tmp_path / 'scratch'}")
    with pytest.raises(
        ConfigError, match=r"callbacks.model_checkpoint.dirpath=.*scratch.*run_dir="
    ):
        check_train_config(cfg)
    with pytest.raises(ConfigError, match="dirpath=None"):
        check_train_config(compose_config("callbacks.model_checkpoint.dirpath=null"))
    # Copies elsewhere, by another checkpoint callback, are the user's to keep.
    check_train_config(
        compose_config(
            "+callbacks.snapshots._target_=lightning.pytorch.callbacks.ModelCheckpoint",
            f"+callbacks.snapshots.dirpath={tmp_path / 'snapshots'}",
        )
    )


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (['callbacks.model_checkpoint.filename="best/{epoch}"'], True),
        (
            [
                'callbacks.model_checkpoint.filename="{epoch}-{val/balanced_accuracy:.4f}"',
                "callbacks.model_checkpoint.auto_insert_metric_name=true",
            ],
            True,  # Lightning writes "val/balanced_accuracy=" into the name
        ),
        (['callbacks.model_checkpoint.filename="best-{epoch}-{val/auroc:.3f}"'], False),
        (['callbacks.model_checkpoint.filename="best-{epoch}"'], False),
    ],
)
def test_checkpoint_names_that_would_make_folders_are_refused(compose_config, overrides, refused):
    # Lightning saves them below checkpoints/, where the best checkpoint was then lost on resume
    # and by evaluation, and save_top_k never removed the old ones.
    cfg = compose_config(*overrides)
    if refused:
        with pytest.raises(ConfigError, match=r"callbacks.model_checkpoint.filename=.*'/'"):
            check_train_config(cfg)
    else:
        check_train_config(cfg)


def test_a_run_without_its_checkpoint_callback_is_told_it_cannot_resume(compose_config, caplog):
    check_train_config(compose_config("callbacks=none"))
    assert "cannot be resumed with ckpt_path=last" in caplog.text
    caplog.clear()
    check_train_config(compose_config("callbacks=none", "+trainer.enable_checkpointing=false"))
    assert "cannot be resumed" not in caplog.text
