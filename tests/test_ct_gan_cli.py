"""CT-GAN end to end on a tiny LUNA16-layout phantom set: train (and resume), inject, remove,
augment with its fold guard, and no pickle anywhere in what they write."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from test_ct_gan_inject import world_phantom

from ct_gan_augment.__main__ import main
from lungct.cache import prepare_dataset
from lungct.io import read_scan, write_scan
from lungct.tables import read_annotations

NODULES = [(-28.0, 5.0, 4.0, 10.0), (28.0, -6.0, -5.0, 7.0)]
TINY = [
    "cube_size=16", "hole_size=8", "gf=4", "df=4", "discriminator_levels=3", "batch_size=2",
    "checkpoint_every=2", "grid_every=2", "log_every=1", "hist_bins=256", "healthy_per_scan=3",
    "max_nodule_diameter_mm=20", "site_min_separation_mm=16", "site_pleura_mm=[4,1000]",
]  # fmt: skip

# Keras converts tensors with np.array(x, copy=False) semantics that NumPy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:keras.*")


def _set(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _uid(i: int) -> str:
    return f"1.3.6.1.4.1.9999.{i}"


def make_dataset(root: Path) -> dict[str, Path]:
    """Three phantom scans in folds 0-2 with two nodules each, and their cache."""
    data = root / "data"
    rows, excluded, candidates = [], [], []
    for i in range(3):
        scan = world_phantom((1.5, 1.5, 2.0), nodule=NODULES[0], seed=i)
        # Second nodule painted in the same way.
        scan2 = world_phantom((1.5, 1.5, 2.0), nodule=NODULES[1], seed=i)
        scan.array = np.maximum(scan.array, scan2.array)
        scan.seriesuid = _uid(i)
        write_scan(scan, data / f"subset{i}" / f"{_uid(i)}.mhd")
        rows += [[_uid(i), *n] for n in NODULES]
        excluded.append([_uid(i), 0.0, -30.0, 20.0, -1])
        candidates += [[_uid(i), *n[:3], 1] for n in NODULES] + [[_uid(i), 0.0, 0.0, 0.0, 0]]
    header = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
    (data / "annotations.csv").write_text(
        header + "".join(",".join(map(str, r)) + "\n" for r in rows)
    )
    (data / "annotations_excluded.csv").write_text(
        header + "".join(",".join(map(str, r)) + "\n" for r in excluded)
    )
    (data / "candidates.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,class\n"
        + "".join(",".join(map(str, r)) + "\n" for r in candidates)
    )
    report = prepare_dataset(data, root / "cache", workers=1, progress=False)
    assert not report["failed"]
    return {"root": root, "data": data, "cache": root / "cache"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    return make_dataset(tmp_path_factory.mktemp("ctgan"))


@pytest.fixture(scope="module")
def injector(dataset) -> Path:
    out = dataset["root"] / "injector"
    argv = ["train", "--data", str(dataset["data"]), "--cache", str(dataset["cache"]),
            "--folds", "0-1", "--kind", "injector", "--out", str(out), "--steps", "4",
            "--quiet", *_set(TINY)]  # fmt: skip
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def remover(dataset) -> Path:
    out = dataset["root"] / "remover"
    argv = ["train", "--data", str(dataset["data"]), "--cache", str(dataset["cache"]),
            "--folds", "0-1", "--kind", "remover", "--out", str(out), "--steps", "2",
            "--quiet", *_set(TINY)]  # fmt: skip
    assert main(argv) == 0
    return out


def test_train_writes_the_model_folder_and_resumes(dataset, injector: Path, capsys) -> None:
    names = {p.relative_to(injector).as_posix() for p in injector.rglob("*") if p.is_file()}
    for name in ["plan.json", "manifest.json", "normaliser.npz", "normaliser.json",
                 "generator.keras", "discriminator.keras", "logs/train_log.csv",
                 "grids/step_000002.png", "grids/step_000004.png",
                 "checkpoints/epoch_002.keras",
                 "checkpoints/backup/training_metadata.json"]:  # fmt: skip
        assert name in names, name
    assert any(n.startswith("logs/train/events.out.tfevents.") for n in names)
    manifest = json.loads((injector / "manifest.json").read_text())
    assert manifest["kind"] == "injector" and manifest["training_folds"] == [0, 1]
    assert manifest["series"] == [_uid(0), _uid(1)] and manifest["n_cubes"] == 4
    assert manifest["steps_done"] == 4 and "d_acc" in manifest["final"]
    assert manifest["provenance"]["steps"] == 4 and manifest["provenance"]["epochs"] == 2
    with (injector / "logs" / "train_log.csv").open() as f:
        log = list(csv.DictReader(f))
    # An epoch is checkpoint_every (2) steps: 4 steps are 2 epochs, a row each.
    assert [int(r["epoch"]) for r in log] == [0, 1]
    assert [float(r["steps"]) for r in log] == [2.0, 2.0]
    assert {"d_loss", "g_loss", "g_adv", "g_l1", "d_acc", "d_acc_real", "d_acc_fake"} <= set(log[0])
    g = keras.saving.load_model(injector / "generator.keras", safe_mode=True)
    assert tuple(g.output_shape) == (None, 16, 16, 16, 1)

    base = ["train", "--data", str(dataset["data"]), "--cache", str(dataset["cache"]),
            "--folds", "0-1", "--kind", "injector", "--out", str(injector), "--quiet"]  # fmt: skip
    capsys.readouterr()
    assert main(base) == 2, "a second run must not overwrite a model"
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--resume" in err and "\n" not in err
    assert main([*base, "--resume", "--steps", "6"]) == 0
    manifest = json.loads((injector / "manifest.json").read_text())
    assert manifest["steps_done"] == 6
    with (injector / "logs" / "train_log.csv").open() as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2]
    kept = sorted(p.name for p in (injector / "checkpoints").iterdir())
    # keep_checkpoints = 2; precision.json records the dtype policy the backup was made under
    assert kept == ["backup", "epoch_002.keras", "epoch_003.keras", "precision.json"]


def test_inject_and_remove_commands(dataset, injector: Path, remover: Path, capsys) -> None:
    scan_path = dataset["data"] / "subset2" / f"{_uid(2)}.mhd"
    out = dataset["root"] / "tampered" / "inj.mhd"
    capsys.readouterr()
    assert main(["inject", "--scan", str(scan_path), "--model", str(injector),
                 "--world", "-26", "-10", "10", "--out", str(out)]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = read_annotations(printed["annotations"]) if printed["injected"] else None
    original = read_scan(scan_path)
    tampered = read_scan(out)
    assert tampered.geometry == original.geometry
    assert rows is None or len(rows) == 1
    out2 = dataset["root"] / "tampered" / "auto.mhd"
    assert main(["inject", "--scan", str(scan_path), "--model", str(injector), "--auto", "2",
                 "--annotations", str(dataset["data"] / "annotations.csv"),
                 "--out", str(out2)]) == 0  # fmt: skip
    out3 = dataset["root"] / "tampered" / "removed.mhd"
    assert main(["remove", "--scan", str(scan_path), "--model", str(remover),
                 "--world", *map(str, NODULES[0][:3]), "--out", str(out3)]) == 0  # fmt: skip
    assert read_scan(out3).geometry == original.geometry
    capsys.readouterr()
    assert main(["remove", "--scan", str(scan_path), "--model", str(injector),
                 "--world", "0", "0", "0", "--out", str(out3)]) == 2  # fmt: skip
    assert "needs a remover" in capsys.readouterr().err


def test_augment_fold_guard_and_output(dataset, injector: Path, capsys) -> None:
    out = dataset["root"] / "augmented"
    base = ["augment", "--data", str(dataset["data"]), "--cache", str(dataset["cache"]),
            "--model", str(injector), "--per-scan", "1", "--out", str(out), "--quiet"]  # fmt: skip
    capsys.readouterr()
    assert main([*base, "--folds", "0-2"]) == 2
    err = capsys.readouterr().err
    assert "fold(s) 2 are held out" in err and err.count("\n") == 1
    assert not (out / "subset2").exists()
    assert main([*base, "--folds", "0", "--write-patches"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["new_scans"] == 1
    new_uid = f"{_uid(0)}.ctgan0"
    assert (out / "subset0" / f"{new_uid}.mhd").is_file()
    assert not (out / "subset1").exists() and not (out / "subset2").exists()
    table = read_annotations(out / "annotations.csv")
    assert set(table.uids) == {new_uid}
    # The copy keeps its source's nodules and adds the injected ones.
    assert len(table) == len(NODULES) + report["injected"]
    cands = (out / "candidates.csv").read_text().splitlines()
    assert len(cands) == 1 + 3 + report["injected"]
    assert (out / "seriesuids.csv").read_text() == f"{new_uid}\n"
    assert json.loads((out / "augment_manifest.json").read_text())["folds"] == "0"
    # A rerun resumes: nothing is redone.
    assert main([*base, "--folds", "0"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] == 1


def _is_pickle(path: Path) -> bool:
    with path.open("rb") as f:
        return _is_pickle_bytes(f.read(2))


def test_nothing_written_is_a_pickle(dataset, injector: Path, remover: Path) -> None:
    files = [p for d in (injector, remover, dataset["root"]) for p in d.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert path.suffix not in {".pkl", ".pickle", ".joblib", ".p"}, path
        assert not _is_pickle(path), path
        if path.suffix in {".npz", ".npy"}:
            loaded = np.load(path, allow_pickle=False)  # raises on object arrays
            if hasattr(loaded, "files"):
                for key in loaded.files:
                    assert loaded[key].dtype != object
                loaded.close()
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as z:
                for member in z.namelist():
                    assert not member.endswith((".pkl", ".pickle")), member
                    with z.open(member) as f:
                        assert not _is_pickle_bytes(f.read(2)), member


def _is_pickle_bytes(head: bytes) -> bool:
    return head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")


@pytest.mark.parametrize("verb", ["train", "inject", "remove", "augment"])
def test_every_verb_has_help(verb: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_missing_model_folder_is_one_error_line(tmp_path: Path, capsys) -> None:
    scan = world_phantom((2.5, 2.5, 2.5), (60.0, 60.0, 60.0))
    write_scan(scan, tmp_path / "s.mhd")
    code = main(["inject", "--scan", str(tmp_path / "s.mhd"), "--model", str(tmp_path / "none"),
                 "--world", "0", "0", "0", "--out", str(tmp_path / "o.mhd")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "model folder does not exist" in err
