"""``python -m integration demo``: every stage on a synthetic mini-LUNA, start to finish.

The demo generates its data, so it needs nothing downloaded::

    synth -> prepare -> train U-Net -> extract candidates (held-out folds) -> train CT-GAN
    -> augment the training folds -> prepare them -> train MGI-CNN (originals + injected)
    -> score the held-out candidates -> evaluate (FROC, CPM, bootstrap) -> detect report

Folds: the LUNA16 subsets. By default the detector trains on subsets 0-6, validates on 7 and is
tested on 8-9; the CT-GAN only ever sees 0-6. Every stage writes its usual files, so each
can be opened or rerun by hand; ``DIR/models`` is a models folder for ``integration detect``.
``DIR/summary.json`` holds the headline numbers and the seconds each stage took. The stage
sequence itself lives in :mod:`integration.stages`, shared with ``crossval`` and ``ablate``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from integration.stages import (
    Split,
    StageClock,
    StagePaths,
    StageRun,
    StageSettings,
    fold_uids,
    run_candidate_stage,
    run_fpr_stage,
    write_series,
)
from lungct.errors import LungCTError
from lungct.fileio import write_json_atomic
from lungct.tables import read_seriesuids


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

    def stage_settings(self) -> StageSettings:
        """The settings of the trained stages (:mod:`integration.stages`)."""
        return StageSettings(
            unet_variant=self.unet_variant,
            unet_minutes=self.unet_minutes,
            gan=self.gan,
            gan_minutes=self.gan_minutes,
            gan_per_scan=self.gan_per_scan,
            fpr_plan=self.fpr_plan,
            fpr_minutes=self.fpr_minutes,
            tta=self.tta,
        )

    @property
    def split(self) -> Split:
        """The folds as a :class:`Split`."""
        return Split(self.train_folds, self.val_folds, self.test_folds)


def run_demo(out_dir: str | os.PathLike, config: DemoConfig | None = None) -> dict:
    """Run the whole suite on a synthetic mini-LUNA in ``out_dir``; return the summary."""
    from integration.evaluation import write_outputs
    from integration.modelset import write_model_set
    from integration.pipeline import Detector, PipelineConfig, detect
    from integration.stages import evaluate_submission
    from lungct.cache import prepare_dataset
    from lungct.synth import generate_dataset

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
    # The demo always extracts and scores again (cheap); trained models are kept.
    run = StageRun(
        data=data,
        cache=cache,
        split=config.split,
        settings=config.stage_settings(),
        paths=StagePaths.single_run(out, models),
        clock=clock,
        workers=config.workers,
        reuse=False,
    )

    # Stage 1: U-Net candidates.
    test_candidates = run_candidate_stage(run)
    test_uids = fold_uids(data, config.test_folds)
    test_series = write_series(out / "seriesuids_test.csv", test_uids)
    stage1 = clock.run(
        "evaluate candidates",
        lambda: evaluate_submission(
            data, test_series, test_candidates, bootstrap=0, label="U-Net candidates", cap=False
        ),
    )

    # CT-GAN (trained and applied inside the training folds only), then stage 2: MGI-CNN.
    submission = run_fpr_stage(run, test_candidates)
    result = clock.run(
        "evaluate",
        lambda: evaluate_submission(
            data, test_series, submission, bootstrap=config.bootstrap, label="U-Net + MGI-CNN"
        ),
    )
    write_outputs(result, out / "evaluation")

    # One held-out scan through the deployable pipeline.
    PipelineConfig(threshold=0.5, tta=config.tta).save(models)
    write_model_set(
        models,
        name="demo",
        description=(
            f"Trained by `integration demo` on {config.scans} small synthetic scans in a few "
            "minutes per stage: a set for seeing the suite work, not for reading scans."
        ),
        performance=(
            "See the demo's `summary.json` and `evaluation/metrics.json` (its own held-out "
            "subsets of the synthetic data)."
        ),
    )
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
