import csv
import itertools
import json
import math

import pytest
import torch
from matplotlib.figure import Figure

from pneumonia.errors import NonFiniteOutputError
from pneumonia.metrics.diagnostic import METRIC_NAMES
from pneumonia.metrics.shift import (
    PERTURBATIONS,
    SEVERITY_PARAMETERS,
    ShiftSuiteResult,
    run_shift_suite,
    shift_suite_figure,
)

ORDER = [
    "contrast",
    "gamma",
    "brightness",
    "blur",
    "noise",
    "downscale",
    "jpeg",
    "zoom",
    "rotation",
]
SEVERITIES = (1, 2, 3)


def _apply(name, images, severity, seed=0):
    return PERTURBATIONS[name](images, severity, torch.Generator().manual_seed(seed))


def _random_images(shape=(3, 1, 64, 64), low=0, high=256, seed=0):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )


def _smooth_texture(side=64, seed=0):
    # Random blobs at a few scales: something JPEG has to work on, without clipping.
    generator = torch.Generator().manual_seed(seed)
    field = torch.zeros(1, 1, side, side)
    for cells in (4, 8, 16):
        coarse = torch.rand(1, 1, cells, cells, generator=generator)
        field += torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear")
    field = (field - field.min()) / (field.max() - field.min())
    return (40 + 170 * field).round().to(torch.uint8)


def _checkerboard(side, square=1):
    index = torch.arange(side) // square
    return ((index[:, None] + index[None, :]) % 2 * 255).to(torch.uint8).view(1, 1, side, side)


def _high_frequency_energy(images):
    values = images.float()
    return float(
        (values[..., 1:, :] - values[..., :-1, :]).pow(2).sum()
        + (values[..., :, 1:] - values[..., :, :-1]).pow(2).sum()
    )


# --- the perturbations --------------------------------------------------------------------------


def test_registry_order_and_table():
    assert list(PERTURBATIONS) == ORDER
    assert list(SEVERITY_PARAMETERS) == ORDER
    assert all(len(values) == 3 for values in SEVERITY_PARAMETERS.values())


@pytest.mark.parametrize("name", ORDER)
@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("shape", [(2, 1, 128, 128), (2, 1, 96, 160)])
def test_shape_dtype_range_and_input_untouched(name, severity, shape):
    images = _random_images(shape)
    before = images.clone()
    out = _apply(name, images, severity)
    assert out.shape == images.shape
    assert out.dtype == torch.uint8
    assert int(out.min()) >= 0 and int(out.max()) <= 255
    assert torch.equal(images, before)
    assert not torch.equal(out, images)  # every perturbation does something to a random image


@pytest.mark.parametrize("name", ORDER)
def test_perturbation_rejects_bad_severity_and_input(name):
    images = _random_images((1, 1, 32, 32))
    for bad in (0, 4, 1.5, True):
        with pytest.raises(ValueError, match=r"severit.*\[1, 2, 3\]"):
            _apply(name, images, bad)
    with pytest.raises(ValueError, match="uint8"):
        _apply(name, images.float(), 1)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_contrast_keeps_a_constant_image(severity):
    images = torch.full((2, 1, 16, 16), 100, dtype=torch.uint8)
    images[1] = 7
    assert torch.equal(_apply("contrast", images, severity), images)


def test_contrast_reduces_std_monotonically():
    images = _random_images((2, 1, 64, 64))
    stds = [float(images.float().std())] + [
        float(_apply("contrast", images, s).float().std()) for s in SEVERITIES
    ]
    assert all(a > b for a, b in itertools.pairwise(stds)), stds
    # The factor 0.8/0.6/0.4 of the table, up to rounding.
    for factor, std in zip((0.8, 0.6, 0.4), stds[1:], strict=True):
        assert std == pytest.approx(factor * stds[0], rel=0.02)


def test_gamma_darkens_mid_greys_and_keeps_the_ends():
    images = torch.tensor([0, 64, 128, 192, 255], dtype=torch.uint8).view(1, 1, 1, 5)
    previous = images
    for severity in SEVERITIES:
        out = _apply("gamma", images, severity)
        assert out[0, 0, 0, 0] == 0 and out[0, 0, 0, 4] == 255
        assert (out[..., 1:4] < previous[..., 1:4]).all(), (severity, out)
        previous = out
    # 255 * 0.5 ** 1.3 = 103.6
    assert int(_apply("gamma", images, 1)[0, 0, 0, 2]) == round(255 * (128 / 255) ** 1.3)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_brightness_raises_the_mean_by_the_stated_amount(severity):
    images = _random_images((3, 1, 32, 32), high=150)  # no clipping even at +61 levels
    out = _apply("brightness", images, severity)
    expected = 255 * (0.08, 0.16, 0.24)[severity - 1]
    assert float(out.float().mean() - images.float().mean()) == pytest.approx(expected, abs=1)


def test_brightness_saturates_at_white():
    images = torch.full((1, 1, 8, 8), 250, dtype=torch.uint8)
    assert (_apply("brightness", images, 3) == 255).all()


def test_blur_removes_high_frequencies_more_with_severity():
    images = _checkerboard(128, square=2)
    energies = [_high_frequency_energy(images)] + [
        _high_frequency_energy(_apply("blur", images, s)) for s in SEVERITIES
    ]
    assert all(a > b for a, b in itertools.pairwise(energies)), energies
    assert energies[3] < 0.01 * energies[0]


def test_blur_sigma_scales_with_the_side():
    # The same scene at twice the resolution gets the same blur relative to its size: blurred
    # then brought back to the small grid, it matches the small image blurred (a fixed sigma in
    # pixels would blur the large one half as much: a mean difference of ~32 levels here).
    small = _checkerboard(64, square=8)
    large = torch.repeat_interleave(torch.repeat_interleave(small, 2, dim=2), 2, dim=3)
    blurred_small = _apply("blur", small, 3).float()
    blurred_large = torch.nn.functional.avg_pool2d(_apply("blur", large, 3).float(), 2)
    assert float((blurred_small - small.float()).abs().mean()) > 30
    assert float((blurred_small - blurred_large).abs().mean()) < 5


def test_blur_keeps_a_constant_image():
    images = torch.full((1, 1, 32, 32), 77, dtype=torch.uint8)
    for severity in SEVERITIES:
        assert torch.equal(_apply("blur", images, severity), images)


def test_noise_is_reproducible_and_seed_dependent():
    images = torch.full((3, 1, 32, 32), 128, dtype=torch.uint8)
    for severity in SEVERITIES:
        first = _apply("noise", images, severity, seed=1)
        assert torch.equal(first, _apply("noise", images, severity, seed=1))
        assert not torch.equal(first, _apply("noise", images, severity, seed=2))
        std = float((first.float() - 128).std())
        assert std == pytest.approx(255 * (0.02, 0.05, 0.10)[severity - 1], rel=0.1)


def test_noise_does_not_depend_on_batching():
    images = _random_images((5, 1, 16, 16))
    whole = _apply("noise", images, 2, seed=3)
    generator = torch.Generator().manual_seed(3)
    parts = torch.cat(
        [
            PERTURBATIONS["noise"](images[:2], 2, generator),
            PERTURBATIONS["noise"](images[2:], 2, generator),
        ]
    )
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_downscale_destroys_a_one_pixel_checkerboard(severity):
    images = _checkerboard(64)
    out = _apply("downscale", images, severity)
    assert float(out.float().std()) < 0.2 * float(images.float().std())
    assert float(out.float().mean()) == pytest.approx(127.5, abs=3)


def test_downscale_keeps_coarse_structure():
    images = _checkerboard(64, square=16)
    out = _apply("downscale", images, 1)
    # Only the edges soften (a 1 px checkerboard loses ~127 levels a pixel).
    assert float((out.float() - images.float()).abs().mean()) < 20
    assert float(out.float().std()) > 0.8 * float(images.float().std())


def test_jpeg_changes_texture_more_at_lower_quality():
    images = _smooth_texture() + 0  # contiguous copy
    images = (images.int() + _checkerboard(64, square=2).int() // 8).clamp(0, 255).to(torch.uint8)
    errors = [
        float((_apply("jpeg", images, s).float() - images.float()).abs().mean()) for s in SEVERITIES
    ]
    assert 0 < errors[0] < errors[1] < errors[2], errors


def test_zoom_enlarges_a_centred_square():
    images = torch.zeros(1, 1, 64, 64, dtype=torch.uint8)
    images[..., 24:40, 24:40] = 255
    areas = [int((images > 127).sum())] + [
        int((_apply("zoom", images, s) > 127).sum()) for s in SEVERITIES
    ]
    assert all(a < b for a, b in itertools.pairwise(areas)), areas
    # Side grows by the zoom factor: area by its square (1.5 ** 2 = 2.25), up to the pixel grid.
    assert areas[3] == pytest.approx(256 * 1.5**2, rel=0.15)
    # Still centred.
    rows, cols = torch.nonzero(_apply("zoom", images, 3)[0, 0] > 127, as_tuple=True)
    assert float(rows.float().mean()) == pytest.approx(31.5, abs=1)
    assert float(cols.float().mean()) == pytest.approx(31.5, abs=1)


def test_rotation_moves_a_horizontal_bar_off_its_row():
    images = torch.zeros(1, 1, 64, 64, dtype=torch.uint8)
    images[..., 31:33, 12:52] = 255
    off_row = []
    for severity in SEVERITIES:
        out = _apply("rotation", images, severity)
        bright = out[0, 0] > 127
        off_row.append(int(bright[:31].sum() + bright[33:].sum()))
        # Roughly the same amount of bar, turned rather than erased.
        assert int(bright.sum()) == pytest.approx(80, rel=0.35)
    assert off_row[2] > 30, off_row  # 20 degrees over a 40 px bar: ends ~7 px off the row
    assert off_row[0] < off_row[1] < off_row[2], off_row


def test_rotation_is_counter_clockwise_and_fills_black():
    images = torch.zeros(1, 1, 64, 64, dtype=torch.uint8)
    images[..., 31:33, 40:60] = 255  # a bar right of the centre
    out = _apply("rotation", images, 3)[0, 0] > 127
    rows, _ = torch.nonzero(out, as_tuple=True)
    assert float(rows.float().mean()) < 31  # counter-clockwise: the right-hand bar goes up
    white = torch.full((1, 1, 64, 64), 255, dtype=torch.uint8)
    rotated = _apply("rotation", white, 3)
    assert rotated[0, 0, 0, 0] == 0 and rotated[0, 0, 32, 32] == 255


# --- the runner ---------------------------------------------------------------------------------

VALUES = [10, 60, 200, 250, 100, 180, 140, 20, 30]
LABELS = [0, 0, 1, 1, 1, 0, 1, 0, 0]


def _constant_images(values=VALUES, side=16):
    return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, side, side) + 0


def _mean_intensity(batch):
    return batch.float().mean(dim=(1, 2, 3)) / 255


def _run(images=None, labels=None, **kwargs):
    kwargs.setdefault("progress", False)
    return run_shift_suite(
        kwargs.pop("predict", _mean_intensity),
        _constant_images() if images is None else images,
        torch.tensor(LABELS) if labels is None else labels,
        kwargs.pop("threshold", 0.5),
        **kwargs,
    )


def test_clean_metrics_match_a_hand_computation():
    result = _run()
    # >= 127.5 is PNEUMONIA: 200, 250, 180, 140. tp 3 (200, 250, 140), fp 1 (180), fn 1 (100), tn 4.
    expected = {
        "balanced_accuracy": (3 / 4 + 4 / 5) / 2,
        "precision": 3 / 4,
        "recall": 3 / 4,
        "specificity": 4 / 5,
        "f1": 6 / 8,
        "accuracy": 7 / 9,
        "auroc": 18 / 20,  # 100 ranks above 4 negatives, 140 above 4, 200 and 250 above all 5
    }
    assert list(result.clean) == list(METRIC_NAMES)
    for name, value in expected.items():
        assert result.clean[name] == pytest.approx(value), name
    assert all(isinstance(v, float) for v in result.clean.values())
    assert result.threshold == 0.5


def test_rows_and_score():
    result = _run(images=_random_images((9, 1, 32, 32), seed=4), batch_size=4)
    assert len(result.rows) == 9 * 3
    assert [(r["perturbation"], r["severity"]) for r in result.rows] == [
        (n, s) for n in ORDER for s in SEVERITIES
    ]
    assert all(set(r) == {"perturbation", "severity", *METRIC_NAMES} for r in result.rows)
    mean = sum(r["balanced_accuracy"] for r in result.rows) / len(result.rows)
    assert result.score == pytest.approx(mean)


def test_score_sees_the_perturbations():
    # Gamma darkens the mid-grey 140 (PNEUMONIA) below the mean-intensity classifier's 127.5.
    result = _run(perturbations=["gamma"])
    # At severity 3 the NORMAL 180 falls below it too: 255 * (180 / 255) ** 2.2 = 118.6.
    assert [r["recall"] for r in result.rows] == [0.5, 0.5, 0.5]
    assert [r["specificity"] for r in result.rows] == [0.8, 0.8, 1.0]
    assert result.score == pytest.approx((0.65 + 0.65 + 0.75) / 3)
    assert result.score < result.clean["balanced_accuracy"]


def test_a_perturbation_that_changes_nothing_is_named(caplog):
    # At 32 px the blur sigmas of severities 1 and 2 are 0.125 and 0.25 px: they round away, and
    # those sets would pass for robustness in the score (against runs at larger sizes).
    images = _random_images((9, 1, 32, 32), seed=7)
    result = _run(images=images, perturbations=["blur", "noise"])
    assert result.unchanged == ["blur 1", "blur 2"]
    assert "blur 1, blur 2 left every 32x32 image unchanged" in caplog.text
    assert "scored as clean: blur 1, blur 2" in result.to_markdown()
    assert result.to_dict()["unchanged"] == ["blur 1", "blur 2"]
    assert (
        _run(images=_random_images((9, 1, 128, 128), seed=7), perturbations=["blur"]).unchanged
        == []
    )


def test_results_are_reproducible_and_batch_size_free():
    images = _random_images((9, 1, 32, 32), low=100, high=156, seed=5)

    def predict(batch):  # sensitive to the noise: the share of bright pixels
        return (batch > 128).float().mean(dim=(1, 2, 3))

    first = _run(images=images, predict=predict, batch_size=4).to_dict()
    assert first == _run(images=images, predict=predict, batch_size=4).to_dict()
    assert first == _run(images=images, predict=predict, batch_size=64).to_dict()


def test_a_set_does_not_depend_on_the_other_perturbations():
    images = _random_images((6, 1, 16, 16), seed=6)

    def recorder(seen):
        def predict(batch):
            seen.append(batch.clone())
            return _mean_intensity(batch)

        return predict

    full, alone, other_seed = [], [], []
    _run(images=images, labels=torch.tensor(LABELS[:6]), predict=recorder(full), batch_size=4)
    _run(
        images=images,
        labels=torch.tensor(LABELS[:6]),
        predict=recorder(alone),
        batch_size=4,
        perturbations=["noise"],
    )
    _run(
        images=images,
        labels=torch.tensor(LABELS[:6]),
        predict=recorder(other_seed),
        batch_size=4,
        perturbations=["noise"],
        seed=1,
    )
    per_set = 2  # batches of 4 and 2
    noise_start = (1 + ORDER.index("noise") * 3) * per_set
    noise_full = full[noise_start : noise_start + 3 * per_set]
    noise_alone = alone[per_set:]  # after the clean set
    assert all(torch.equal(a, b) for a, b in zip(noise_full, noise_alone, strict=True))
    assert not all(
        torch.equal(a, b) for a, b in zip(alone[per_set:], other_seed[per_set:], strict=True)
    )
    assert torch.equal(torch.cat(full[:per_set]), images)  # the clean set is untouched


def test_exports(tmp_path):
    result = _run()
    path = result.to_csv(tmp_path / "out" / "shift.csv")
    assert path == tmp_path / "out" / "shift.csv"
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 + 27
    assert rows[0]["perturbation"] == "clean" and rows[0]["severity"] == "0"
    assert {r["perturbation"] for r in rows[1:]} == set(ORDER)
    assert list(rows[0]) == ["perturbation", "severity", *METRIC_NAMES]
    assert float(rows[0]["balanced_accuracy"]) == pytest.approx(result.clean["balanced_accuracy"])

    markdown = result.to_markdown()
    for name in ORDER:
        assert f"| {name} |" in markdown
    assert "severity 3" in markdown and "clean" in markdown
    assert f"{result.score:.3f}" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 9
    assert len({line.count("|") for line in table}) == 1  # every row has every column

    data = result.to_dict()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data["score"] == pytest.approx(result.score)
    assert len(data["rows"]) == 27


def test_to_dict_with_one_class_has_no_nan():
    result = _run(labels=torch.ones(9, dtype=torch.long))
    assert math.isnan(result.clean["auroc"])
    assert not math.isnan(result.score)  # balanced accuracy is defined with one class
    data = result.to_dict()
    assert data["clean"]["auroc"] is None
    json.dumps(data, allow_nan=False)


def test_bad_arguments_raise_before_any_prediction():
    def predict(batch):
        raise AssertionError("predict must not run")

    with pytest.raises(ValueError, match=r"'fog'.*contrast.*rotation"):
        _run(predict=predict, perturbations=["blur", "fog"])
    with pytest.raises(ValueError, match=r"severity 4.*\[1, 2, 3\]"):
        _run(predict=predict, severities=(1, 4))
    with pytest.raises(ValueError, match=r"severity 0"):
        _run(predict=predict, severities=(0,))
    with pytest.raises(ValueError, match="no perturbation"):
        _run(predict=predict, perturbations=[])
    with pytest.raises(ValueError, match="label"):
        _run(predict=predict, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="uint8"):
        _run(predict=predict, images=_constant_images().float())


def test_a_subset_of_perturbations_and_severities():
    result = _run(perturbations=["zoom", "gamma"], severities=(3,))
    assert [(r["perturbation"], r["severity"]) for r in result.rows] == [("zoom", 3), ("gamma", 3)]
    assert "severity 1" not in result.to_markdown()


def test_predict_returning_the_wrong_length_raises():
    with pytest.raises(ValueError, match="predict returned"):
        _run(predict=lambda batch: torch.zeros(1))


def test_a_non_finite_output_on_a_perturbed_set_stops_the_suite_naming_the_set():
    # NaN is never >= the threshold: uncaught, it would count as a correct NORMAL call.
    images = _constant_images(values=[200, 160, 120, 90])
    clean = _mean_intensity(images)

    def nan_when_perturbed(batch):
        mean = _mean_intensity(batch)
        return torch.where(torch.isin(mean, clean), mean, torch.nan)

    labels = torch.tensor([1, 1, 0, 0])
    assert _run(images, labels, predict=nan_when_perturbed, perturbations=["blur"]).unchanged
    with pytest.raises(NonFiniteOutputError, match="shift suite's brightness 1 set are not finite"):
        _run(images, labels, predict=nan_when_perturbed, perturbations=["brightness"])
    with pytest.raises(NonFiniteOutputError, match="shift suite's gamma 1 set"):
        _run(images, labels, predict=nan_when_perturbed, perturbations=["gamma"])


def test_figure(tmp_path):
    result = _run()
    fig = shift_suite_figure(result)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert [label for label in labels if label in ORDER] == ORDER
    first = ax.get_lines()[0]
    assert list(first.get_xdata()) == [0, 1, 2, 3]
    assert first.get_ydata()[0] == pytest.approx(result.clean["balanced_accuracy"])
    assert f"{result.score:.3f}" in ax.get_title()
    assert ax.get_xlabel() and ax.get_ylabel()
    assert ax.get_legend() is not None
    fig.savefig(tmp_path / "shift.png")
    assert (tmp_path / "shift.png").stat().st_size > 0
    shift_suite_figure(result, metric="auroc")
    with pytest.raises(ValueError, match="unknown metric"):
        shift_suite_figure(result, metric="sharpness")


def test_result_is_a_plain_dataclass():
    result = ShiftSuiteResult(
        clean=dict.fromkeys(METRIC_NAMES, 0.5),
        rows=[{"perturbation": "blur", "severity": 1, **dict.fromkeys(METRIC_NAMES, 0.25)}],
        threshold=0.3,
        score=0.25,
    )
    assert "| blur | 0.500 | 0.250 | 0.250 |" in result.to_markdown()
