import csv

import pytest

from pneumonia.data.patients import parse_patient_id, patient_id


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1_virus_6_1.jpeg", "person1"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0505-0001-0001.jpeg", "IM-0505"),
        ("NORMAL2-IM-0666-0001.jpeg", "NORMAL2-IM-0666"),
        ("NORMAL2-IM-1345-0001-0002.jpeg", "NORMAL2-IM-1345"),
        ("some/dir/person7_bacteria_29.jpeg", "person7"),
        ("my_scan.png", "my_scan"),
    ],
)
def test_patient_id_of_kaggle_names(filename, expected):
    assert patient_id(filename) == expected


def test_patient_id_matches_every_row_of_the_manifest(data_root):
    with (data_root / "MANIFEST.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) > 5000
    wrong = [
        (r["filename"], r["patient_id"])
        for r in rows
        if patient_id(r["filename"]) != r["patient_id"]
    ]
    assert wrong == []


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("NORMAL2-IM-0666-0001.jpeg", "NORMAL2-IM-0666"),
        ("my_scan.png", None),
        ("person_x.jpeg", None),  # "person" without a number is not the Kaggle scheme
        ("IMG-0001.jpeg", None),
    ],
)
def test_parse_patient_id_says_when_a_name_has_none(filename, expected):
    assert parse_patient_id(filename) == expected
