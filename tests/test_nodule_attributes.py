"""nodule_attributes.csv: the LIDC ratings of each synthetic nodule, written and read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungct.errors import LungCTError
from lungct.synth import generate_dataset
from lungct.synth.shapes import shape_ratings
from lungct.tables import (
    NODULE_ATTRIBUTE_COLUMNS,
    RATING_COLUMNS,
    read_annotations,
    read_nodule_attributes,
    read_seriesuids,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, 3, 11, "small", progress=False, workers=1)
    return out


def test_every_nodule_has_its_outline_s_ratings(dataset: Path) -> None:
    import json

    series = read_seriesuids(dataset / "seriesuids.csv")
    table = read_nodule_attributes(dataset / "nodule_attributes.csv", known_series=series)
    nodules = read_annotations(dataset / "annotations.csv")
    assert len(table) == len(nodules) > 0
    np.testing.assert_allclose(table.coords, nodules.coords)
    np.testing.assert_allclose(table.diameter_mm, nodules.diameter_mm)
    ratings, _ = shape_ratings()
    records = sorted((dataset / ".synth").glob("scan_*.json"))
    shapes = [row[7] for r in records for row in json.loads(r.read_text())["annotations"]]
    header = (dataset / "nodule_attributes.csv").read_text().splitlines()[0].split(",")
    assert tuple(header) == NODULE_ATTRIBUTE_COLUMNS
    for i, shape in enumerate(shapes):
        if shape < 0:  # an analytic shape: not rated
            assert table.rating_readers[i] == 0 and np.isnan(table.ratings[i]).all()
        else:  # one reader's outline, with that reader's ratings
            assert table.rating_readers[i] == 1
            np.testing.assert_array_equal(table.ratings[i], ratings[shape])
    assert (table.rating_readers == 1).any()
    malignancy = table.rating("malignancy")
    rated = ~np.isnan(malignancy)
    assert ((malignancy[rated] >= 1) & (malignancy[rated] <= 5)).all()
    assert RATING_COLUMNS[-1] == "malignancy"


def _table(tmp_path: Path, cells: str) -> Path:
    path = tmp_path / "nodule_attributes.csv"
    path.write_text(",".join(NODULE_ATTRIBUTE_COLUMNS) + "\n" + cells + "\n")
    return path


@pytest.mark.parametrize(
    ("cells", "problem"),
    [
        ("s1,1,2,3,8.0,3,1,3,1,6,3,3,2,2,5,6,17", "'malignancy': '6' is not a rating from 1 to 5"),
        ("s1,1,2,3,8.0,3,1,0,1,6,3,3,2,2,5,4,17", "'subtlety': '0' is not a rating from 1 to 5"),
        ("s1,1,2,3,8.0,3,1,3,1,7,3,3,2,2,5,4,17", "'calcification': '7' is not a rating from 1"),
        ("s1,1,2,3,8.0,3,2,3.3,1,6,3,3,2,2,5,4,17", "'subtlety': '3.3' is not a rating"),
        ("s1,1,2,3,8.0,3,0,3,1,6,3,3,2,2,5,4,17", "ratings given but rating_readers is 0"),
        ("s9,1,2,3,8.0,3,1,3,1,6,3,3,2,2,5,4,17", "s9"),
    ],
)
def test_a_bad_rating_or_series_is_a_clear_error(tmp_path: Path, cells: str, problem: str) -> None:
    path = _table(tmp_path, cells)
    with pytest.raises(LungCTError, match="nodule_attributes.csv") as err:
        read_nodule_attributes(path, known_series={"s1"})
    assert problem in str(err.value)


def test_unrated_rows_and_medians_read_back(tmp_path: Path) -> None:
    path = _table(
        tmp_path, "s1,1,2,3,8.0,3,0,,,,,,,,,,\ns1,4,5,6,5.5,4,4,3.5,1,6,3,3,2,2,5,4.5,1;2;3;4"
    )
    table = read_nodule_attributes(path)
    assert table.rating_readers.tolist() == [0, 4]
    assert np.isnan(table.ratings[0]).all()
    assert table.rating("malignancy")[1] == 4.5 and table.rating("subtlety")[1] == 3.5


def test_a_nodule_takes_the_outline_of_a_nodule_of_about_its_size() -> None:
    from lungct.synth.shapes import SOLID, load_shape_library

    lib = load_shape_library()
    ratings, _ = shape_ratings()
    rng = np.random.default_rng(4)
    small = [lib.pick(rng, SOLID, 4.0) for _ in range(300)]
    large = [lib.pick(rng, SOLID, 22.0) for _ in range(300)]
    assert np.median(lib.diameter_eq_mm[large]) > 2.5 * np.median(lib.diameter_eq_mm[small])
    # In LIDC the readers rate large nodules as more malignant, and so do the picked outlines.
    malignancy = RATING_COLUMNS.index("malignancy")
    assert ratings[large, malignancy].mean() > ratings[small, malignancy].mean() + 1.0
    assert lib.category[small + large].tolist() == [SOLID] * 600
