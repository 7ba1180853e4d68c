"""Region shares of attribution mass on hand-placed maps."""

from __future__ import annotations

import math

import pytest
import torch

from pneumonia.explain.trust.regions import (
    REGION_NAMES,
    format_region_table,
    region_area_shares,
    region_masks,
    region_shares,
    summarize_by_class,
)


@pytest.mark.parametrize(("height", "width"), [(32, 32), (17, 23), (224, 224)])
def test_masks_are_disjoint_and_cover_the_image(height: int, width: int) -> None:
    masks = region_masks(height, width)
    assert set(masks) == set(REGION_NAMES)
    stacked = torch.stack([masks[name].long() for name in REGION_NAMES])
    assert stacked.shape == (3, height, width)
    assert torch.equal(stacked.sum(dim=0), torch.ones(height, width, dtype=torch.long))
    assert all(mask.any() for mask in masks.values())


def test_regions_sit_where_the_anatomy_is() -> None:
    masks = region_masks(32, 32)
    assert masks["central"][16, 16]  # image centre: heart
    assert masks["lungs"][12, 6] and masks["lungs"][12, 25]  # both lateral fields
    assert masks["border"][0, 0] and masks["border"][16, 0] and masks["border"][31, 16]
    # Left-right symmetric, as a frontal view is.
    for mask in masks.values():
        assert torch.equal(mask, mask.flip(-1))


def test_area_shares_of_a_32_pixel_frame() -> None:
    # Pixel centres (i + 0.5) / 32. Central: columns 11..20 (10) x rows 6..29 (24) = 240 pixels.
    # Lungs: columns 3..10 and 21..28 (16) x rows 3..28 (26) = 416. Border: the other 368.
    shares = region_area_shares(32, 32)
    assert shares == pytest.approx(
        {"central": 240 / 1024, "lungs": 416 / 1024, "border": 368 / 1024}
    )


def test_all_positive_mass_on_a_central_pixel() -> None:
    maps = torch.zeros(1, 1, 32, 32)
    maps[0, 0, 16, 16] = 3.0
    shares = region_shares(maps)
    assert shares["positive"]["central"].item() == pytest.approx(1.0)
    assert shares["positive"]["lungs"].item() == 0.0
    assert all(math.isnan(shares["negative"][name].item()) for name in REGION_NAMES)


def test_negative_mass_on_the_border_only() -> None:
    maps = torch.zeros(2, 32, 32)  # (B, H, W) is accepted too
    maps[:, 0, :] = -1.0
    shares = region_shares(maps)
    torch.testing.assert_close(shares["negative"]["border"], torch.ones(2, dtype=torch.float64))
    assert torch.isnan(shares["positive"]["border"]).all()


def test_shares_split_each_signs_mass_by_region_after_summing_channels() -> None:
    maps = torch.zeros(1, 2, 32, 32)
    maps[0, 0, 16, 16] = 1.0  # central
    maps[0, 0, 12, 6] = 3.0  # left lung
    maps[0, 1, 0, 0] = -2.0  # border
    maps[0, 0, 12, 25] = -2.0  # right lung
    maps[0, 0, 31, 16], maps[0, 1, 31, 16] = 5.0, -5.0  # channels cancel: no mass at all
    shares = region_shares(maps)
    expected = {
        "positive": {"central": 0.25, "lungs": 0.75, "border": 0.0},
        "negative": {"central": 0.0, "lungs": 0.5, "border": 0.5},
    }
    for sign, by_region in expected.items():
        assert {name: shares[sign][name].item() for name in REGION_NAMES} == pytest.approx(
            by_region
        ), sign


def test_summary_per_class_skips_images_without_mass() -> None:
    maps = torch.zeros(3, 1, 32, 32)
    maps[0, 0, 16, 16] = 1.0  # NORMAL: centre
    maps[1, 0, 0, 0] = 1.0  # PNEUMONIA: border
    # image 2 (PNEUMONIA) has no positive mass and must not drag the mean to NaN.
    maps[2, 0, 16, 16] = -1.0
    labels = torch.tensor([0, 1, 1])
    rows = summarize_by_class(region_shares(maps), labels, explained=labels)
    by_key = {(row["class"], row["sign"]): row for row in rows}
    assert len(rows) == 4 and {row["explained"] for row in rows} == {"NORMAL", "PNEUMONIA"}
    assert by_key["NORMAL", "positive"]["central"] == pytest.approx(1.0)
    assert by_key["PNEUMONIA", "positive"]["border"] == pytest.approx(1.0)
    assert by_key["PNEUMONIA", "positive"]["images"] == 1
    assert by_key["PNEUMONIA", "negative"]["central"] == pytest.approx(1.0)
    assert math.isnan(by_key["NORMAL", "negative"]["central"])
    assert by_key["NORMAL", "negative"]["images"] == 0


def test_maps_explaining_different_classes_are_not_averaged_together() -> None:
    # target=predicted: a NORMAL X-ray called PNEUMONIA is explained for PNEUMONIA; its positive
    # mass is evidence for the other class than that of the NORMAL X-rays explained for NORMAL.
    maps = torch.zeros(3, 1, 32, 32)
    maps[0, 0, 16, 16] = 1.0  # NORMAL explained for NORMAL: centre
    maps[1, 0, 16, 16] = 1.0  # the same
    maps[2, 0, 0, 0] = 1.0  # NORMAL explained for PNEUMONIA: border
    rows = summarize_by_class(
        region_shares(maps), torch.tensor([0, 0, 0]), explained=torch.tensor([0, 0, 1])
    )
    by_key = {(row["class"], row["explained"], row["sign"]): row for row in rows}
    assert sorted(by_key) == [
        ("NORMAL", "NORMAL", "negative"),
        ("NORMAL", "NORMAL", "positive"),
        ("NORMAL", "PNEUMONIA", "negative"),
        ("NORMAL", "PNEUMONIA", "positive"),
    ]  # fmt: skip  (no PNEUMONIA X-rays: no rows for them)
    assert by_key["NORMAL", "NORMAL", "positive"]["central"] == pytest.approx(1.0)
    assert by_key["NORMAL", "NORMAL", "positive"]["images"] == 2
    assert by_key["NORMAL", "PNEUMONIA", "positive"]["border"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one explained class per image"):
        summarize_by_class(region_shares(maps), torch.tensor([0, 0, 0]), torch.tensor([0, 1]))


def test_table_lists_classes_regions_and_chance() -> None:
    maps = torch.zeros(2, 1, 32, 32)
    maps[0, 0, 16, 16] = 1.0  # NORMAL: all positive mass central, no negative mass
    maps[1, 0, 12, 6], maps[1, 0, 0, 0] = 1.0, -1.0  # PNEUMONIA: positive lungs, negative border
    rows = summarize_by_class(region_shares(maps), torch.tensor([0, 1]), torch.tensor([1, 1]))
    lines = format_region_table(rows, region_area_shares(32, 32)).splitlines()
    assert [line.split() for line in lines] == [
        ["class", "explained", "sign", "central", "lungs", "border", "images"],
        ["NORMAL", "PNEUMONIA", "positive", "100.0%", "0.0%", "0.0%", "1"],
        ["NORMAL", "PNEUMONIA", "negative", "n/a", "n/a", "n/a", "0"],
        ["PNEUMONIA", "PNEUMONIA", "positive", "0.0%", "100.0%", "0.0%", "1"],
        ["PNEUMONIA", "PNEUMONIA", "negative", "0.0%", "0.0%", "100.0%", "1"],
        ["area", "(chance)", "23.4%", "40.6%", "35.9%"],
    ]
    # Fixed width: the numeric columns line up.
    assert len({len(line) for line in lines[:-1]}) == 1
