"""``python -m integration demo``: every stage on a synthetic mini-LUNA, start to finish.

The demo generates its data, so it needs nothing downloaded::

    synth -> prepare -> train U-Net -> extract candidates (held-out folds) -> train CT-GAN
    -> augment the training folds -> prepare them -> train MGI-CNN (originals + injected)
    -> score the held-out candidates -> evaluate (FROC, CPM, bootstrap) -> detect report

Folds: the LUNA16 subsets. By default the detector trains on subsets 0-6, validates on 7 and is
tested on 8-9; the CT-GAN only ever sees 0-6. Every stage writes its usual files, so each
can be opened or rerun by hand; ``DIR/models`` is a models folder for ``integration detect``.
``DIR/summary.json`` holds the headline numbers and the seconds each stage took.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lungct.errors import LungCTError
from lungct.fileio import write_json_atomic
from lungct.tables import read_seriesuids, write_csv_atomic


@dataclass
class DemoConfig:
    """Sizes and time budgets of the demo (defaults: about 15 minutes on 2 CPU cores)."""

    scans: int = 20
    seed: int = 0
    size: str = "small"
    train_folds: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
    val_folds: tuple[int, ...] = (7,)
    test_folds: tuple[int, ...] = (8, 9)
    unet_variant: str = "2d"
    unet_minutes: float = 3.0
    gan: bool = True
    gan_minutes: float = 2.0
    gan_per_scan: int = 2
    fpr_plan: str = "default"
    fpr_minutes: float = 4.0
    tta: bool = False
    bootstrap: int = 1000
    workers: int = 2

    @property
    def all_folds(self) -> tuple[int, ...]:
        """Every fold the demo touches."""
        return self.train_folds + self.val_folds + self.test_folds


@dataclass
class StageClock:
    """Seconds per stage, printed as they finish."""

    seconds: dict[str, float] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one stage, timing it."""
        self.log(f"[demo] {name} ...")
        t0 = time.perf_counter()
        result = fn()
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        self.log(f"[demo] {name}: {self.seconds[name]:.1f} s")
        return result


def _fold_uids(data_dir: Path, folds: tuple[int, ...]) -> list[str]:
    from lungct.cache import find_scans

    return [s.seriesuid for s in find_scans(data_dir, folds)]


def _merge_candidates(paths: list[Path], out: Path) -> Path:
    """One candidates table from several (same columns)."""
    from lungct.tables import read_candidates

    rows: list[list[Any]] = []
    for path in paths:
        table = read_candidates(path)
        for i in range(len(table)):
            rows.append([table.uid_of(i), *table.coords[i].tolist(), int(table.label[i])])
    write_csv_atomic(out, ("seriesuid", "coordX", "coordY", "coordZ", "class"), rows)
    return out


def run_demo(out_dir: str | os.PathLike, config: DemoConfig | None = None) -> dict:
    """Run the whole suite on a synthetic mini-LUNA in ``out_dir``; return the summary."""
    from ct_gan_augment.augment import augment_dataset
    from ct_gan_augment.train import train_gan
    from fp_reduction_3dcnn.config import get_plan as fpr_plan
    from fp_reduction_3dcnn.predict import predict as fpr_predict
    from fp_reduction_3dcnn.train import train as fpr_train
    from integration.evaluation import evaluate_files, write_outputs
    from integration.pipeline import Detector, PipelineConfig, detect
    from lungct.cache import prepare_dataset
    from lungct.synth import generate_dataset
    from unet_candidates.config import variant_plan
    from unet_candidates.extract import extract_paths
    from unet_candidates.train import train as unet_train

    config = config or DemoConfig()
    out = Path(out_dir)
    data, cache, models = out / "data", out / "cache", out / "models"
    clock = StageClock()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "demo_config.json", asdict(config))

    clock.run(
        "synth",
        lambda: generate_dataset(data, config.scans, config.seed, config.size, progress=True),
    )
    clock.run(
        "prepare",
        lambda: prepare_dataset(data, cache, workers=config.workers, progress=True),
    )

    # Stage 1: U-Net candidates.
    unet_dir = models / "unet"
    if not (unet_dir / "model.keras").is_file():
        clock.run(
            "train U-Net",
            lambda: unet_train(
                variant_plan(config.unet_variant),
                data,
                cache,
                list(config.train_folds),
                list(config.val_folds),
                unet_dir,
                resume=(unet_dir / "checkpoints" / "state.json").is_file(),
                max_minutes=config.unet_minutes,
            ),
        )
    test_candidates = out / "candidates_test.csv"
    clock.run(
        "extract candidates",
        lambda: extract_paths(
            unet_dir, test_candidates, data_dir=data, folds=list(config.test_folds), cache_dir=cache
        ),
    )
    test_uids = _fold_uids(data, config.test_folds)
    test_series = out / "seriesuids_test.csv"
    test_series.write_text("".join(f"{u}\n" for u in test_uids))
    stage1 = clock.run(
        "evaluate candidates",
        lambda: evaluate_files(
            data / "annotations.csv",
            data / "annotations_excluded.csv",
            test_series,
            test_candidates,
            cap=False,
            label="U-Net candidates",
        ),
    )

    # CT-GAN: trained and applied inside the training folds only.
    fpr_sources = [data / "candidates.csv"]
    if config.gan:
        gan_dir = models / "gan"
        if not (gan_dir / "generator.keras").is_file():
            clock.run(
                "train CT-GAN",
                lambda: train_gan(
                    data,
                    cache,
                    config.train_folds,
                    "injector",
                    gan_dir,
                    resume=any((gan_dir / "checkpoints").glob("*")),
                    max_seconds=60.0 * config.gan_minutes,
                ),
            )
        augmented = out / "augmented"
        clock.run(
            "augment training folds",
            lambda: augment_dataset(
                data, gan_dir, augmented, config.train_folds, config.gan_per_scan, cache_dir=cache
            ),
        )
        clock.run(
            "prepare augmented",
            lambda: prepare_dataset(augmented, cache, workers=config.workers, progress=True),
        )
        fpr_sources.append(augmented / "candidates.csv")
    train_candidates = _merge_candidates(fpr_sources, out / "candidates_train.csv")

    # Stage 2: MGI-CNN false-positive reduction.
    fpr_dir = models / "fpr"
    if not (fpr_dir / "model.keras").is_file():
        clock.run(
            "train MGI-CNN",
            lambda: fpr_train(
                fpr_plan(config.fpr_plan),
                cache,
                train_candidates,
                list(config.train_folds),
                list(config.val_folds),
                fpr_dir,
                test_folds=list(config.test_folds),
                resume=(fpr_dir / "checkpoints").is_dir(),
                max_minutes=config.fpr_minutes,
            ),
        )
    submission = out / "submission.csv"
    clock.run(
        "score candidates",
        lambda: fpr_predict(fpr_dir, cache, test_candidates, submission, tta=config.tta),
    )
    result = clock.run(
        "evaluate",
        lambda: evaluate_files(
            data / "annotations.csv",
            data / "annotations_excluded.csv",
            test_series,
            submission,
            bootstrap=config.bootstrap,
            seed=0,
            label="U-Net + MGI-CNN",
        ),
    )
    write_outputs(result, out / "evaluation")

    # One held-out scan through the deployable pipeline.
    PipelineConfig(threshold=0.5, tta=config.tta).save(models)
    report_scan = sorted((data / f"subset{config.test_folds[0]}").glob("*.mhd"))[0]
    clock.run(
        "detect report",
        lambda: detect(report_scan, Detector.load(models), out / "report"),
    )

    metrics = result.to_json()
    stage1_json = stage1.to_json()
    summary = {
        "cpm": metrics["cpm"],
        "sensitivity": metrics["sensitivity"],
        "cpm_ci95": metrics.get("cpm_ci95"),
        "nodules": metrics.get("nodules"),
        "detected": metrics.get("detected"),
        "test_scans": len(test_uids),
        "candidate_sensitivity": stage1_json.get("candidate_sensitivity"),
        "candidates_per_scan": stage1_json.get("candidates_per_scan"),
        "seconds": clock.seconds,
        "total_seconds": round(sum(clock.seconds.values()), 1),
        "config": asdict(config),
        "figures": {
            "froc": str(out / "evaluation" / "froc.png"),
            "report": str(out / "report" / "report.html"),
        },
    }
    write_json_atomic(out / "summary.json", summary)
    if read_seriesuids(test_series) != test_uids:
        raise LungCTError(test_series, "series list was not written correctly")
    return summary
