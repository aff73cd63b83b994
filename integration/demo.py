"""``python -m integration demo``: the shipped detector measured, then every stage trained briefly.

The demo generates its data, so it needs nothing downloaded. It has three parts, and keeps
their numbers apart in ``DIR/summary.json``:

1. ``shipped``: the shipped model set (:data:`integration.modelset.SHIPPED_MODELS`) measured on
   a freshly generated full-size synthetic test set (by default 10 scans at 512x512 with 15
   nodules each: 150 nodules, a random seed no training of the set used). The exact LUNA16
   evaluation gives the CPM with its bootstrap interval and the FROC figure
   (``DIR/shipped/evaluation``). False positives are counted per scan as in LUNA16, so the
   dense nodules do not flatter the CPM; they only make 150 nodules cheap to measure.
2. ``report``: the shipped detector on one of those scans, with its HTML report
   (``DIR/report/report.html``).
3. ``short_run``: a short training of every stage on a small synthetic mini-LUNA, minutes per
   stage, so the loop can be seen::

       synth -> prepare -> train U-Net -> extract candidates (held-out folds) -> train CT-GAN
       -> augment the training folds -> prepare them -> train MGI-CNN (originals + injected)
       -> score the held-out candidates -> evaluate (FROC, CPM, bootstrap)

   Folds: the LUNA16 subsets; the detector trains on subsets 0-6, validates on 7 and is tested
   on 8-9; the CT-GAN only ever sees 0-6. Its number measures minutes of training on a few
   small scans, not the shipped set. ``DIR/short_run/models`` is a models folder for
   ``integration detect --models``. The stage sequence lives in :mod:`integration.stages`,
   shared with ``crossval`` and ``ablate``.

Rerunning the same ``DIR`` reuses the generated data, caches and trained models.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from integration.stages import (
    Split,
    Stage,
    StageClock,
    StagePaths,
    StageRun,
    StageSettings,
    fold_uids,
    run_stages,
    write_series,
)
from lungct.errors import LungCTError
from lungct.fileio import write_json_atomic
from lungct.tables import read_seriesuids

EVAL_SEED = 5000
"""Random seed of the demo's test set: the shipped set's recipe trains on seeds 1000 and 1100."""


@dataclass
class DemoConfig:
    """Sizes and time budgets of the demo (defaults: about 10 minutes on 2 CPU cores).

    Args:
        eval_scans: scans of the shipped set's test set (0: skip parts 1 and 2).
        eval_nodules_per_scan: nodules asked for in each of them.
        eval_seed: its random seed (no training of the shipped set used it).
        eval_size: 'full' (512x512, LUNA16's spacings) or 'small' (for quick checks only).
        short_run: run part 3, the short training of every stage.
        scans, seed, size: the short run's synthetic mini-LUNA.
        train_folds, val_folds, test_folds: the short run's split.
        unet_minutes, gan_minutes, fpr_minutes: the short run's training budgets.
        gan: augment the short run's training folds with CT-GAN-injected copies.
        tta: test-time augmentation of the short run's MGI-CNN scores.
        bootstrap: bootstrap resamples of each CPM interval.
        workers: processes for generating and preparing data.
    """

    eval_scans: int = 10
    eval_nodules_per_scan: int = 15
    eval_seed: int = EVAL_SEED
    eval_size: str = "full"
    short_run: bool = True
    scans: int = 20
    seed: int = 0
    size: str = "small"
    train_folds: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
    val_folds: tuple[int, ...] = (7,)
    test_folds: tuple[int, ...] = (8, 9)
    unet_preset: str = "2d"
    unet_minutes: float = 1.0
    gan: bool = True
    gan_minutes: float = 0.75
    gan_per_scan: int = 2
    fpr_plan: str = "default"
    fpr_minutes: float = 1.25
    tta: bool = False
    bootstrap: int = 1000
    workers: int = 2

    @property
    def all_folds(self) -> tuple[int, ...]:
        """Every fold the short run touches."""
        return self.train_folds + self.val_folds + self.test_folds

    def stage_settings(self) -> StageSettings:
        """The settings of the short run's stages (:mod:`integration.stages`)."""
        return StageSettings(
            unet_preset=self.unet_preset,
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
        """The short run's folds as a :class:`Split`."""
        return Split(self.train_folds, self.val_folds, self.test_folds)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _interval(metrics: dict[str, Any]) -> dict[str, Any]:
    """CPM, its interval and the interval's half-width from an evaluation's ``to_json``."""
    ci = metrics.get("cpm_ci95")
    return {
        "cpm": metrics["cpm"],
        "cpm_ci95": ci,
        "cpm_half_width": None if not ci else round((ci[1] - ci[0]) / 2.0, 4),
        "sensitivity": metrics["sensitivity"],
        "nodules": metrics.get("nodules"),
        "detected": metrics.get("detected"),
        "scans": metrics.get("scans"),
    }


def run_demo(
    out_dir: str | os.PathLike,
    config: DemoConfig | None = None,
    models_dir: str | os.PathLike | None = None,
) -> dict:
    """Run the demo in ``out_dir`` and return its summary (also ``out_dir/summary.json``).

    Args:
        out_dir: output folder (created; a rerun reuses what is there).
        config: sizes and budgets (default :class:`DemoConfig`).
        models_dir: the model set parts 1 and 2 measure (default: the shipped one).
    """
    config = config or DemoConfig()
    if config.eval_scans < 0 or config.eval_scans > 200:
        raise LungCTError(None, f"the demo's test scans must be 0-200, got {config.eval_scans}")
    if config.eval_scans == 0 and not config.short_run:
        raise LungCTError(None, "nothing to run: no test scans and no short run")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clock = StageClock(log=_stderr)
    write_json_atomic(out / "demo_config.json", asdict(config))
    summary: dict[str, Any] = {}
    if config.eval_scans:
        summary["shipped"], summary["report"] = _measure_shipped(out, config, clock, models_dir)
    if config.short_run:
        summary["short_run"] = _short_run(out / "short_run", config, clock)
    summary["seconds"] = clock.seconds
    summary["total_seconds"] = round(sum(clock.seconds.values()), 1)
    summary["config"] = asdict(config)
    write_json_atomic(out / "summary.json", summary)
    return summary


def _measure_shipped(
    out: Path, config: DemoConfig, clock: StageClock, models_dir: str | os.PathLike | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parts 1 and 2: the model set on a fresh test set, and one scan's report."""
    from integration.modelset import SHIPPED_MODELS, read_model_set
    from integration.pipeline import Detector, detect
    from integration.recipe import evaluate_model_set
    from lungct.synth import generate_dataset

    models = Path(models_dir) if models_dir is not None else SHIPPED_MODELS
    model_set = read_model_set(models)
    root = out / "shipped"
    data, cache = root / "data", root / "cache"
    made = clock.run(
        "generate the test set",
        lambda: generate_dataset(
            data,
            config.eval_scans,
            config.eval_seed,
            config.eval_size,
            progress=True,
            workers=config.workers,
            nodules_per_scan=config.eval_nodules_per_scan,
        ),
    )
    result = clock.run(
        f"measure model set '{model_set.name}'",
        lambda: evaluate_model_set(
            models,
            data,
            cache,
            root,
            bootstrap=config.bootstrap,
            workers=config.workers,
            label=f"{model_set.name} {model_set.version}",
        ),
    )
    by_size = json.loads((root / "evaluation" / "by_size.json").read_text())
    shipped = {
        "what": (
            f"model set '{model_set.name}' version {model_set.version}, as shipped, on "
            f"{config.eval_scans} fresh {config.eval_size}-size synthetic scans with "
            f"{config.eval_nodules_per_scan} nodules asked for in each (random seed "
            f"{config.eval_seed}, which no training of the set used)"
        ),
        "model_set": model_set.summary(),
        **_interval(result.to_json()),
        "by_size": by_size,
        "test_set": {
            "path": str(data),
            "scans": made["n_scans"],
            "nodules": made["n_annotations"],
            "seed": config.eval_seed,
            "size": config.eval_size,
            "nodules_per_scan": config.eval_nodules_per_scan,
        },
        "froc": str(root / "evaluation" / "froc.png"),
        "metrics": str(root / "evaluation" / "metrics.json"),
    }
    scan = sorted(data.glob("subset0/*.mhd"))[0]
    detector = Detector.load(models)
    detections = clock.run(
        "detect report", lambda: detect(scan, detector, out / "report", log=_stderr)
    )
    threshold = detector.config.threshold
    report = {
        "scan": str(scan),
        "html": str(out / "report" / "report.html"),
        "detections": str(out / "report" / "detections.csv"),
        "marks_above_threshold": sum(d.probability >= threshold for d in detections.detections),
        "threshold": threshold,
        "seconds": round(sum(detections.timings.values()), 1),
    }
    return shipped, report


def _short_run(out: Path, config: DemoConfig, clock: StageClock) -> dict[str, Any]:
    """Part 3: a short training of every stage on a small synthetic mini-LUNA."""
    from integration.evaluation import write_outputs
    from integration.modelset import write_model_set
    from integration.pipeline import PipelineConfig
    from integration.stages import evaluate_submission
    from lungct.cache import prepare_dataset
    from lungct.synth import generate_dataset

    data, cache, models = out / "data", out / "cache", out / "models"
    out.mkdir(parents=True, exist_ok=True)
    clock.run(
        "short run: synth",
        lambda: generate_dataset(
            data, config.scans, config.seed, config.size, progress=True, workers=config.workers
        ),
    )
    clock.run(
        "short run: prepare",
        lambda: prepare_dataset(data, cache, workers=config.workers, progress=True),
    )
    # The short run always extracts and scores again (cheap); trained models are kept.
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
    test_uids = fold_uids(data, config.test_folds)
    test_series = write_series(out / "seriesuids_test.csv", test_uids)
    stage1: list[Any] = []

    def evaluate_candidates(stage: Stage) -> None:
        if stage.name == "candidates":
            stage1.append(
                clock.run(
                    "short run: evaluate candidates",
                    lambda: evaluate_submission(
                        data,
                        test_series,
                        run.paths.test_candidates,
                        bootstrap=0,
                        label="U-Net candidates",
                        cap=False,
                    ),
                )
            )

    submission = run_stages(run, after=evaluate_candidates).submission
    stage1_result = stage1[0]
    result = clock.run(
        "short run: evaluate",
        lambda: evaluate_submission(
            data,
            test_series,
            submission,
            bootstrap=config.bootstrap,
            label="short run: U-Net + MGI-CNN",
        ),
    )
    write_outputs(result, out / "evaluation")
    if read_seriesuids(test_series) != test_uids:
        raise LungCTError(test_series, "series list was not written correctly")

    PipelineConfig(threshold=0.5, tta=config.tta).save(models)
    write_model_set(
        models,
        name="demo-short-run",
        description=(
            f"Trained by `integration demo` on {config.scans} small synthetic scans in a few "
            "minutes per stage: a set for seeing the suite work, not for reading scans."
        ),
        performance=(
            "See the demo's `summary.json` (`short_run`) and `short_run/evaluation/metrics.json` "
            "(its own held-out subsets of the synthetic data)."
        ),
    )
    budget = config.unet_minutes + config.fpr_minutes + (config.gan_minutes if config.gan else 0)
    return {
        "what": (
            f"a short training of every stage ({budget:.1f} minutes of training in all) on "
            f"{config.scans} small synthetic scans, tested on their subsets "
            f"{', '.join(map(str, config.test_folds))}: it shows the loop; it is not the "
            "shipped set's number"
        ),
        **_interval(result.to_json()),
        "candidate_sensitivity": stage1_result.to_json().get("candidate_sensitivity"),
        "candidates_per_scan": stage1_result.to_json().get("candidates_per_scan"),
        "froc": str(out / "evaluation" / "froc.png"),
        "models": str(models),
    }
