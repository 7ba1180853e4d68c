"""Patient ids from Kermany chest X-ray file names.

One child can have several images; splitting must keep them together, so every file maps to a
patient id:

    person1000_bacteria_2931.jpeg   -> person1000
    person1_virus_6_1.jpeg          -> person1
    IM-0115-0001.jpeg               -> IM-0115
    IM-0505-0001-0001.jpeg          -> IM-0505
    NORMAL2-IM-0666-0001.jpeg       -> NORMAL2-IM-0666

A name that follows neither scheme (a user's own data) is its own patient: the file stem. Such
images cannot be grouped with the other images of their child, so discovery counts them and warns
(:func:`parse_patient_id` tells them apart).
"""

from __future__ import annotations

import re
from pathlib import PurePath

_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_IM = re.compile(r"^((?:NORMAL\d+-)?IM-\d+)(?:-|$)", re.IGNORECASE)


def parse_patient_id(filename: str | PurePath) -> str | None:
    """The patient id encoded in an image's file name, or None if the name follows no known scheme."""
    stem = PurePath(filename).stem
    for pattern in (_PERSON, _IM):
        match = pattern.match(stem)
        if match:
            return match.group(1)
    return None


def patient_id(filename: str | PurePath) -> str:
    """Return the patient id encoded in an image's file name (directories are ignored).

    A name without one is its own patient: its stem.
    """
    parsed = parse_patient_id(filename)
    return parsed if parsed is not None else PurePath(filename).stem
