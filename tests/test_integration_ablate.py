"""`integration ablate`: grid parsing, stage sharing between configs, table, figure, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from integration.__main__ import main
from integration.ablate import DEFAULT_SPLIT, final_val_auc, load_grid, stage_keys
from integration.evaluation import candidate_sensitivity
from integration.stages import StageSettings
from integration.testing import tiny_dataset, tiny_settings
from lungct.errors import LungCTError
from lungct.tables import read_annotations, read_results, read_seriesuids

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_default_grid_covers_the_ablations() -> None:
    grid = load_grid()
    by_name = {c.name: c.settings for c in grid.configs}
    settings = list(by_name.values())
    assert {s.gan for s in settings if s.fpr} == {True, False}
    assert {s.fpr_variant for s in settings if s.fpr} == {"mgi", "ri", "lr", "zoom_in", "zoom_out"}
    assert {s.merge for s in settings if s.fpr} == {"sum", "concat", "conv1x1"}
    assert {s.unet_preset for s in settings if s.candidates == "unet"} == {"2d", "3d"}
    assert {s.candidates for s in settings} == {"unet", "centernet"}
    assert any(not s.fpr for s in settings)
    assert {s.tta for s in settings if s.fpr} == {True, False}
    # Shared trainings: the U-Net per variant, one CT-GAN, one MGI-CNN per network / GAN choice
    # (the MGI-CNN's variants and merges, the 3-D ResNet and the small 3-D CNN).
    keys = {name: stage_keys(s, DEFAULT_SPLIT) for name, s in by_name.items()}
    distinct = {
        stage: {k[stage][0] for k in keys.values() if stage in k}
        for stage in ("unet", "gan", "fpr")
    }
    # The stage-1 slot holds the two U-Nets and the CenterNet.
    assert {k: len(v) for k, v in distinct.items()} == {"unet": 3, "gan": 1, "fpr": 10}
    assert keys["centernet"]["unet"][0].startswith("centernet-")
    # The CenterNet config differs from the reference in stage 1 only.
    assert keys["centernet"]["fpr"] == keys["full"]["fpr"]
    assert keys["centernet"]["gan"] == keys["full"]["gan"]
    assert keys["tta"]["fpr"] == keys["full"]["fpr"]  # TTA rescores the same model
    assert keys["unet3d"]["fpr"] == keys["full"]["fpr"]  # the MGI-CNN does not see the U-Net
    assert keys["unet_alone"]["unet"] == keys["full"]["unet"] and "fpr" not in keys["unet_alone"]
    assert keys["no_gan"]["fpr"] != keys["full"]["fpr"]


def test_grid_errors(tmp_path: Path) -> None:
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"configs": {"a": {"fpr_variant": "mgi", "tta": "yes"}}}))
    with pytest.raises(LungCTError, match="config a: setting 'tta' must be a bool"):
        load_grid(path)
    path.write_text(json.dumps({"configs": {"a": {"fpr_varaint": "ri"}}}))
    with pytest.raises(LungCTError, match=r"unknown settings \['fpr_varaint'\]"):
        load_grid(path)
    path.write_text(json.dumps({"configs": {"a": {"fpr_variant": "rx"}}}))
    with pytest.raises(LungCTError, match="variant must be one of"):
        load_grid(path)
    path.write_text(json.dumps({"configs": {"a/b": {}}}))
    with pytest.raises(LungCTError, match="config name"):
        load_grid(path)
    path.write_text(json.dumps({"base": {}, "configs": {}}))
    with pytest.raises(LungCTError, match="non-empty 'configs'"):
        load_grid(path)
    with pytest.raises(LungCTError, match="must be > 0"):
        StageSettings.from_dict({"fpr_minutes": 0})


def test_a_grid_of_an_earlier_version_says_integration_for_merge(tmp_path: Path) -> None:
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"configs": {"a": {"integration": "concat"}}}))
    (config,) = load_grid(path).configs
    assert config.settings.merge == "concat" and "integration" not in config.settings.to_dict()
    assert config.settings.fpr_plan_resolved().merge == "concat"
    path.write_text(json.dumps({"configs": {"a": {"integration": "concat", "merge": "sum"}}}))
    with pytest.raises(LungCTError, match="both merge and integration") as exc:
        load_grid(path)
    assert "\n" not in str(exc.value)


def test_seeds_make_configs_of_their_own(tmp_path: Path) -> None:
    from integration.ablate import seeded

    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"seeds": 3, "configs": {"a": {"fpr_overrides": {"epochs": 2}}}}))
    grid = load_grid(path)
    assert grid.seeds == 3 and load_grid("default").seeds == 3 and load_grid("quick").seeds == 1
    (config,) = grid.configs
    assert seeded(config, 0) is config
    two = seeded(config, 2)
    assert two.name == "a.seed2"
    assert two.settings.fpr_overrides == {"epochs": 2, "seed": 2}
    assert two.settings.unet_overrides == {"seed": 2} == two.settings.gan_overrides
    assert two.settings.fpr_plan_resolved().seed == 2
    keys, keys2 = (
        stage_keys(config.settings, DEFAULT_SPLIT),
        stage_keys(two.settings, DEFAULT_SPLIT),
    )
    assert all(keys[stage][0] != keys2[stage][0] for stage in keys)  # nothing shared across seeds
    for bad in (0, -1, 1.5, True, "3"):
        path.write_text(json.dumps({"seeds": bad, "configs": {"a": {}}}))
        with pytest.raises(LungCTError, match="'seeds' must be a whole number"):
            load_grid(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    """Four small synthetic scans (subsets 0-3) and their cache on a 2 mm grid."""
    return tiny_dataset(tmp_path_factory.mktemp("ablate"))


def _ablate(dataset: dict[str, Path], out: Path, grid: Path, *extra: str) -> list[str]:
    return [
        "ablate", "--data", str(dataset["data"]), "--cache", str(dataset["cache"]),
        "--out", str(out), "--grid", str(grid), "--train-folds", "0-1", "--val-folds", "2",
        "--test-folds", "3", "--bootstrap", "20", "--workers", "1", "--quiet", *extra,
    ]  # fmt: skip


def test_ablate_shares_stages_and_writes_table(dataset: dict[str, Path], capsys) -> None:
    root = dataset["root"]
    grid = root / "grid.json"
    grid.write_text(
        json.dumps(
            {
                "description": "tiny",
                "base": tiny_settings(),
                "configs": {
                    "mgi": {},
                    "mgi_tta": {"tta": True},
                    "unet_alone": {"fpr": False},
                    "ri_no_gan": {"fpr_variant": "ri", "gan": False},
                },
            }
        )
    )
    out = root / "out"
    assert main(_ablate(dataset, out, grid)) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "4 configs share 1 U-Net, 1 CT-GAN and 2 MGI-CNN trainings" in printed
    # Each shared stage trained once: one U-Net, one CT-GAN, two MGI-CNNs.
    assert printed.count("train U-Net ...") == 1
    assert printed.count("train CT-GAN ...") == 1
    assert printed.count("train MGI-CNN ...") == 2
    assert printed.count("extract candidates ...") == 1
    stages = sorted(p.name for p in (out / "stages").iterdir())
    assert [s.split("-")[0] for s in stages] == ["fpr", "fpr", "gan", "unet"]
    results = {
        name: json.loads((out / "configs" / name / "result.json").read_text())
        for name in ("mgi", "mgi_tta", "unet_alone", "ri_no_gan")
    }
    assert results["mgi_tta"]["stages"] == results["mgi"]["stages"]
    assert results["unet_alone"]["stages"] == {"unet": results["mgi"]["stages"]["unet"]}
    assert "gan" not in results["ri_no_gan"]["stages"]
    # U-Net alone: the U-Net's candidates are the submission.
    candidates = out / "stages" / results["mgi"]["stages"]["unet"] / "candidates_test.csv"
    submission = out / "configs" / "unet_alone" / "submission.csv"
    assert submission.read_text() == candidates.read_text()
    # Stage 1 on its own: its test candidates against candidates per scan, in every config
    # that shares it.
    stage1 = candidate_sensitivity(
        read_annotations(dataset["data"] / "annotations.csv"),
        read_results(candidates),
        read_seriesuids(out / "configs" / "mgi" / "seriesuids.csv"),
    ).to_json()
    assert stage1["nodules"] > 0
    for name in ("mgi", "mgi_tta", "unet_alone", "ri_no_gan"):
        assert results[name]["candidate_stage"] == stage1
    # The FP reducer's last validation AUC, from its log (none without an FP reducer).
    fpr_model = out / "stages" / results["mgi"]["stages"]["fpr"] / "model"
    assert (fpr_model / "logs" / "train_log.csv").is_file()
    assert results["mgi"]["fpr_val_auc"] == final_val_auc(fpr_model)
    assert "fpr_val_auc" not in results["unet_alone"]

    with open(out / "ablation.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["config"] for r in rows] == ["mgi", "mgi_tta", "unet_alone", "ri_no_gan"]
    for r in rows:
        assert 0.0 <= float(r["cpm"]) <= 1.0
        assert float(r["cpm_ci95_lower"]) <= float(r["cpm_ci95_upper"])
        assert all(f"sens_{k}" in r for k in ("0.125", "0.25", "0.5", "1", "2", "4", "8"))
        assert r["scans"] == "1"
        assert float(r["cpm"]) == pytest.approx(results[r["config"]]["metrics"]["cpm"])
        for budget in ("10", "25", "50", "100"):
            expected = stage1["candidate_sensitivity_at"][budget]
            assert float(r[f"candidate_sens_{budget}"]) == pytest.approx(expected)
    table = (out / "ablation.md").read_text()
    assert (
        "| config | CPM [95% CI] | - mgi [paired 95% CI] | p | 1/8 | 1/4 | 1/2 | 1 | 2 | 4 | 8 |"
        in table
    )
    assert "| mgi | " in table and "| reference |" in table
    compared = json.loads((out / "comparison" / "comparison.json").read_text())
    assert compared["reference"] == "mgi"
    assert [d["label"] for d in compared["differences"]] == ["mgi_tta", "unet_alone", "ri_no_gan"]
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + 4
    assert "none (U-Net scores)" in table
    # Whether each trained stage had converged, read from its log (too short here to say).
    assert set(results["mgi"]["convergence"]) == {"unet", "fpr"}
    assert set(results["unet_alone"]["convergence"]) == {"unet"}
    assert (out / "ablation_froc.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "convergence.png").read_bytes()[:4] == b"\x89PNG"

    # Rerun: every config is skipped, nothing is trained again, the table is rewritten; a
    # result of an earlier version, without the stage-1 figures and the FP reducer's AUC,
    # gets them from its stages.
    earlier = out / "configs" / "mgi" / "result.json"
    later = ("candidate_stage", "fpr_val_auc")
    earlier.write_text(json.dumps({k: v for k, v in results["mgi"].items() if k not in later}))
    stamp = (out / "configs" / "mgi" / "result.json").stat().st_mtime_ns
    assert main(_ablate(dataset, out, grid)) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.count("already evaluated, skipped") == 4 and " ..." not in printed
    assert (out / "configs" / "mgi" / "result.json").stat().st_mtime_ns == stamp
    with open(out / "ablation.csv", newline="") as handle:
        again = list(csv.DictReader(handle))
    assert [r["cpm"] for r in again] == [r["cpm"] for r in rows]
    for column in ("candidate_sens_50", "fpr_val_auc"):
        assert [r[column] for r in again] == [r[column] for r in rows]

    # A changed config is run again (its MGI-CNN is shared, only scoring is redone).
    data = json.loads(grid.read_text())
    data["configs"]["mgi_tta"]["tta"] = False
    data["configs"]["mgi_tta"]["fpr_minutes"] = 1
    grid.write_text(json.dumps(data))
    assert main(_ablate(dataset, out, grid, "--configs", "mgi_tta")) == 0
    printed = capsys.readouterr().out
    assert "already evaluated" not in printed and "] train " not in printed
    assert "score candidates ..." in printed and "extract candidates" not in printed
    with open(out / "ablation.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4  # the other configs are still listed


def test_ablate_over_training_seeds(dataset: dict[str, Path], capsys) -> None:
    """Two configs, two seeds: four U-Net trainings; the table gives each config's CPM range over
    its seeds and the range of its difference to the reference trained with the same seed."""
    root = dataset["root"]
    grid = root / "seeds_grid.json"
    alone = {"fpr": False, "gan": False}
    wider = {**tiny_settings()["unet_overrides"], "bottleneck_filters": 12}
    configs = {"ref": alone, "other": {**alone, "unet_overrides": wider}}
    grid.write_text(json.dumps({"base": tiny_settings(), "configs": configs}))
    out = root / "seeds_out"
    assert main(_ablate(dataset, out, grid, "--seeds", "2")) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "2 configs x 2 seeds share 4 U-Net" in printed
    assert printed.count("train U-Net ...") == 4
    assert {p.name for p in (out / "configs").iterdir()} == {
        "ref", "ref.seed1", "other", "other.seed1"
    }  # fmt: skip
    with open(out / "ablation.csv", newline="") as handle:
        rows = {r["config"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"ref", "other"} and rows["other"]["seeds"] == "2"
    cpm = {
        name: json.loads((out / "configs" / name / "result.json").read_text())["metrics"]["cpm"]
        for name in ("ref", "ref.seed1", "other", "other.seed1")
    }
    assert float(rows["other"]["cpm_seed_min"]) == pytest.approx(
        min(cpm["other"], cpm["other.seed1"])
    )
    diffs = [cpm["other"] - cpm["ref"], cpm["other.seed1"] - cpm["ref.seed1"]]
    assert float(rows["other"]["cpm_diff_seed_max"]) == pytest.approx(max(diffs))
    assert "| CPM over seeds | - reference over seeds |" in (out / "ablation.md").read_text()


def test_ablate_errors_are_one_line(dataset: dict[str, Path], tmp_path: Path, capsys) -> None:
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"configs": {"a": {}}}))
    argv = _ablate(dataset, tmp_path / "o", grid, "--configs", "b")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no config named 'b'" in err[0]
    argv = _ablate(dataset, tmp_path / "o", grid)
    argv[argv.index("--data") + 1] = str(tmp_path / "absent")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset folder does not exist" in err[0]
    argv = _ablate(dataset, tmp_path / "o", grid)
    argv[argv.index("--test-folds") + 1] = "1"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "both training and test folds" in err[0]


def test_table_and_figure_carry_each_configs_numbers(tmp_path: Path) -> None:
    from integration.ablate import (
        compare_configs,
        final_val_auc,
        plot_ablation,
        plot_convergence,
        write_table,
    )
    from integration.evaluation import evaluate_files, write_outputs

    uids = [f"1.2.{i}" for i in range(8)]
    (tmp_path / "ann.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n" + "".join(f"{u},0,0,0,10\n" for u in uids)
    )
    (tmp_path / "series.csv").write_text("".join(f"{u}\n" for u in uids))
    results = []
    for name, hits, tta in (("strong", 7, True), ("weak", 3, False)):
        lines = ["seriesuid,coordX,coordY,coordZ,probability"]
        for i, u in enumerate(uids):
            if i < hits:
                lines.append(f"{u},1,0,0,{0.9 - 0.01 * i}")  # on the nodule
            lines.append(f"{u},50,50,50,{0.5 + 0.03 * i}")  # a false positive in every scan
        (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n")
        result = evaluate_files(
            tmp_path / "ann.csv", None, tmp_path / "series.csv", tmp_path / f"{name}.csv",
            bootstrap=30, label=name,
        )  # fmt: skip
        metrics = write_outputs(result, tmp_path / "configs" / name / "evaluation")
        settings = StageSettings(tta=tta, fpr_variant="ri" if name == "weak" else None)
        results.append(
            {
                "name": name, "settings": settings.to_dict(), "metrics": metrics,
                "stages": {"unet": "u", "fpr": f"f-{name}"}, "split": DEFAULT_SPLIT.to_dict(),
                "bootstrap": 30,
                "fpr_network": {"variant": "ri" if name == "weak" else "mgi",
                                "merge": "sum", "conv": "2.5d"},
                "convergence": {"unet": {"plateau": True}, "fpr": {"plateau": False}}
                if name == "strong" else {"unet": None},
            }
        )  # fmt: skip
    results[0]["candidate_stage"] = {
        "candidate_sensitivity_at": {"10": 0.5, "25": 0.625, "50": 0.75, "100": 0.875},
        "candidates_per_scan": 40.0,
    }  # and "weak" comes from an earlier version, without them
    results[0]["fpr_val_auc"] = 0.9
    csv_path, md_path = write_table(results, tmp_path)
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    strong, weak = (r["metrics"] for r in results)
    assert strong["cpm"] > weak["cpm"] > 0
    for row, metrics in zip(rows, (strong, weak), strict=True):
        assert float(row["cpm"]) == pytest.approx(metrics["cpm"])
        assert float(row["cpm_ci95_lower"]) == pytest.approx(metrics["cpm_ci95"][0])
        assert float(row["sens_8"]) == pytest.approx(metrics["sensitivity"]["8"])
    assert [r["fpr_variant"] for r in rows] == ["mgi", "ri"]
    assert [r["candidate_sens_50"] for r in rows] == ["0.75", ""]
    assert [r["candidates_per_scan"] for r in rows] == ["40.0", ""]
    assert [r["fpr_val_auc"] for r in rows] == ["0.9", ""]
    table = md_path.read_text().splitlines()
    lo, hi = strong["cpm_ci95"]
    assert table[-2].startswith(f"| strong | {strong['cpm']:.3f} [{lo:.3f}, {hi:.3f}] |")
    assert "| 0.750 | yes | mgi/sum | 0.900 | yes | yes / no |" in table[-2]
    assert "| 2d | - | yes | ri/sum | - | no | ? |" in table[-1]
    figure = plot_ablation(results, tmp_path, tmp_path / "froc.png")
    assert figure.read_bytes()[:4] == b"\x89PNG" and figure.stat().st_size > 10_000
    # Validation losses per epoch, from the stages' logs (one here; the others have none).
    log = tmp_path / "stages" / "u" / "model" / "logs" / "train_log.csv"
    log.parent.mkdir(parents=True)
    log.write_text(
        "epoch,loss,val_loss\n" + "".join(f"{e},1,{1 + 1 / (e + 1)}\n" for e in range(8))
    )
    auc_log = tmp_path / "stages" / "f-strong" / "model" / "logs" / "train_log.csv"
    auc_log.parent.mkdir(parents=True)
    auc_log.write_text("epoch,val_loss,val_auc\n0,0.5,0.7\n1,0.4,0.85\n")
    assert final_val_auc(auc_log.parents[1]) == 0.85  # the last epoch's: the model it keeps
    assert final_val_auc(log.parents[1]) is None and final_val_auc(tmp_path) is None
    auc_log.write_text("epoch,val_loss,val_auc\n0,0.5,0.7\n1,0.4,nan\n")
    assert final_val_auc(auc_log.parents[1]) is None
    figure = plot_convergence(results, tmp_path, tmp_path / "convergence.png")
    assert figure.read_bytes()[:4] == b"\x89PNG" and figure.stat().st_size > 10_000

    # With the configs' submissions and test scans in place, each is compared with the first.
    data = tmp_path / "data"
    data.mkdir()
    (data / "annotations.csv").write_text((tmp_path / "ann.csv").read_text())
    for name in ("strong", "weak"):
        folder = tmp_path / "configs" / name
        (folder / "submission.csv").write_text((tmp_path / f"{name}.csv").read_text())
        (folder / "seriesuids.csv").write_text((tmp_path / "series.csv").read_text())
    comparison = compare_configs(results, data, tmp_path, bootstrap=50, log=lambda _: None)
    (d,) = comparison.differences
    assert (d.label, d.reference) == ("weak", "strong")
    assert d.cpm_difference == pytest.approx(weak["cpm"] - strong["cpm"])
    assert d.ci[1] < 0 and d.excludes_zero  # weak never finds more than strong
    assert (tmp_path / "comparison" / "comparison.json").is_file()
    csv_path, md_path = write_table(results, tmp_path, comparison)
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["cpm_diff"] == "" and float(rows[1]["cpm_diff"]) == pytest.approx(
        d.cpm_difference
    )
    assert float(rows[1]["cpm_diff_ci95_upper"]) == pytest.approx(d.ci[1])
    table = md_path.read_text()
    assert "| - strong [paired 95% CI] | p |" in table
    assert f"| weak | {weak['cpm']:.3f}" in table and f"{d.cpm_difference:+.3f} [" in table
    assert "| strong |" in table and "| reference |" in table


def test_shipped_grids_are_package_data() -> None:
    import tomllib

    from integration.ablate import default_grid_path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "data/*.json" in pyproject["tool"]["setuptools"]["package-data"]["integration"]
    for name in ("default", "quick", "rank"):
        assert default_grid_path(name).is_file()
    quick = load_grid("quick")
    assert len(quick.configs) >= 4 and quick.source == str(default_grid_path("quick"))


def test_rank_grid_trains_by_epochs_within_its_caps() -> None:
    """The ranking grid covers the default grid's configs, and each of its trainings is set
    by epochs (steps) with a minute cap, so a resumed run trains as much as an unbroken one."""
    rank, default = load_grid("rank"), load_grid("default")
    assert {c.name for c in default.configs} <= {c.name for c in rank.configs}
    assert rank.seeds == 3
    for config in rank.configs:
        s = config.settings
        plan = s.candidate_plan()
        assert plan.epochs < 100 and s.candidate_minutes >= 30, config.name
        if s.fpr:
            assert s.fpr_plan_resolved().epochs == 20 and s.fpr_minutes >= 30, config.name
            assert s.fpr_plan_resolved().steps_per_epoch > 0, config.name
        if s.fpr and s.gan:
            assert s.gan_plan_resolved().steps == 1500 and s.gan_minutes >= 30, config.name
