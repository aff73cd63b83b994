"""The whole detector on one scan: preprocess, lung mask, U-Net candidates, MGI-CNN scores.

``python -m integration detect --scan PATH [--models DIR] --out DIR`` runs it. A models folder
is a model set (:mod:`integration.modelset`)::

    DIR/modelset.json  name, version, the stages it holds
    DIR/unet/        a sealed U-Net model folder (python -m unet_candidates train)
    DIR/fpr/         a sealed MGI-CNN model folder (python -m fp_reduction_3dcnn train); a set
                     may leave it out: then the U-Net's probabilities are the scores
    DIR/fpr2/ ...    further MGI-CNNs (optional): their score is the mean of every one's
    DIR/pipeline.json  {"threshold": 0.5, "tta": false, "candidate_weight": 0.0} (optional;
                     report threshold, TTA, and the U-Net's share of a mark's score beside
                     the MGI-CNNs')

Without ``--models`` the set shipped with the suite is used.

The scan is resampled once to the 1 mm world-aligned grid the stages were trained on (the same
grid as the per-scan cache), and both stages work on that one in-memory volume.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from integration.modelset import (
    MODELSET_FILE,
    SHIPPED_MODELS,
    ModelSet,
    fpr_stages,
    read_model_set,
)
from integration.report import Detection, model_set_facts, suspicion_score, write_report
from lungct.cache import CachedScan
from lungct.errors import LungCTError
from lungct.fileio import staged_outputs, write_json_atomic
from lungct.io import read_scan
from lungct.lungmask import segment_lungs, segment_lungs_array
from lungct.plans import JSONPlan
from lungct.preprocess import PreprocessPlan, resample_array
from lungct.scan import AIR_HU, Scan
from lungct.tables import write_csv_atomic

DETECTION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability", "diameter_mm")

OUTPUT_MARKER = "summary.json"
"""The file :func:`detect` publishes last: an output folder without it is incomplete."""

REPORT_OUTPUTS = ("report.html", "overview.png", "detection_*.png", "view3d.png")
"""The report's files; an earlier run's are removed when a new run publishes (a run without
the report, or with fewer crops, must not leave pages about other detections beside it)."""


@dataclass
class PipelineConfig(JSONPlan):
    """Settings stored as ``pipeline.json`` in a models folder (strict JSON, see JSONPlan)."""

    threshold: float = 0.5
    """The report threshold: `detect` reports the marks scoring at or above it as findings."""
    tta: bool = False
    """Score every candidate as the mean over its 8 axial symmetries (test-time augmentation)."""
    batch_size: int = 256
    """Candidates scored per batch by each false-positive reducer."""
    candidate_weight: float = 0.0
    """The share of the candidate network's own probability in a mark's score, for a set with
    false-positive reducers: ``candidate_weight * p(U-Net) + (1 - candidate_weight) *
    mean p(MGI-CNNs)``. 0 scores by the MGI-CNNs alone; without an MGI-CNN the U-Net's
    probability is the score whatever this says."""

    def __post_init__(self) -> None:
        # A string threshold ("0.5") would otherwise fail deep inside the detector.
        t, b = self.threshold, self.batch_size
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ValueError(f"threshold must be a number in [0, 1], got {t!r}")
        w = self.candidate_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
            raise ValueError(f"candidate_weight must be a number in [0, 1], got {w!r}")
        if not isinstance(self.tta, bool):
            raise ValueError(f"tta must be true or false, got {self.tta!r}")
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batch_size must be a positive integer, got {b!r}")

    @classmethod
    def load(cls, models_dir: str | os.PathLike) -> PipelineConfig:  # type: ignore[override]
        """Read ``models_dir/pipeline.json`` (defaults where it is absent)."""
        path = Path(models_dir) / "pipeline.json"
        return super().load(path) if path.is_file() else cls()

    def save(self, models_dir: str | os.PathLike) -> None:  # type: ignore[override]
        """Write ``models_dir/pipeline.json``, atomically; ``candidate_weight`` only when it is
        above 0, so that a set scored the former way stays readable by earlier versions."""
        from lungct.plans import with_plan_format

        content = self.to_dict()
        if not self.candidate_weight:
            content.pop("candidate_weight")
        write_json_atomic(Path(models_dir) / "pipeline.json", with_plan_format(content))


def open_model_set(
    models_dir: str | os.PathLike | None = None, allow_unfinished: bool = False
) -> ModelSet:
    """Check a model set (default: the shipped one) without loading a weight
    (:func:`integration.modelset.read_model_set`).

    Raises:
        LungCTError: no shipped set installed, or what :func:`read_model_set` refuses.
    """
    if models_dir is None:
        models_dir = SHIPPED_MODELS
        if not (models_dir / MODELSET_FILE).is_file():
            raise LungCTError(
                models_dir,
                "no shipped model set in this installation; pass --models DIR (a set "
                "trained with `python -m integration train-models` or `integration demo`)",
            )
    return read_model_set(models_dir, allow_unfinished=allow_unfinished)


@dataclass
class Detector:
    """The trained stages of a model set, loaded once, applied to any number of scans."""

    unet_model: Any
    unet_plan: Any
    fpr: Any | None
    config: PipelineConfig
    models_dir: Path
    model_set: ModelSet | None = None
    malignancy: Any | None = None
    fpr_members: list[Any] = field(default_factory=list)
    """Further false-positive reducers (``fpr2/`` ...): the score is the mean of ``fpr``'s
    and theirs."""

    @property
    def fpr_ensemble(self) -> list[Any]:
        """Every false-positive reducer, ``fpr`` first (empty when the set has none)."""
        return [self.fpr, *self.fpr_members] if self.fpr is not None else []

    @property
    def candidate_weight(self) -> float:
        """The U-Net's share of a mark's score: the config's ``candidate_weight``, 0 for a set
        without an MGI-CNN (whose score is the U-Net's probability alone)."""
        return float(self.config.candidate_weight) if self.fpr is not None else 0.0

    @classmethod
    def load(
        cls,
        models_dir: str | os.PathLike | None = None,
        runtime: str | None = None,
        allow_unfinished: bool = False,
        threads: int | None = None,
    ) -> Detector:
        """Load a model set (default: the shipped one) in Keras safe mode.

        Every stage's seal is checked first (:func:`open_model_set`); ``allow_unfinished``
        accepts stages whose training has not ended. ``runtime`` chooses where the U-Net runs
        (:func:`unet_candidates.runtime.predictor`; default ``LUNGCT_RUNTIME`` or ``auto``:
        ONNX Runtime on a CPU); ``threads`` sizes ONNX Runtime's thread pool (default: one
        thread per core; a worker sharing the machine with others gives its share).

        Raises:
            LungCTError: no such folder, no shipped set installed, not a model set, a
                listed stage missing, a changed file, a format newer than this version, an
                unusable runtime.
        """
        from unet_candidates import load_unet
        from unet_candidates.runtime import default_runtime, predictor

        model_set = open_model_set(models_dir, allow_unfinished=allow_unfinished)
        models_dir = model_set.root
        unet_model, unet_plan = load_unet(models_dir / "unet", allow_unfinished=allow_unfinished)
        unet_model = predictor(
            unet_model, runtime or default_runtime(), threads=threads, model_dir=models_dir / "unet"
        )
        fprs = []
        if fpr_stages(model_set.stages):
            from fp_reduction_3dcnn.predict import open_model

            fprs = [
                open_model(models_dir / stage, allow_unfinished=allow_unfinished)
                for stage in fpr_stages(model_set.stages)
            ]
        fpr = fprs[0] if fprs else None
        malignancy = None
        if "malignancy" in model_set.stages:
            from fp_reduction_3dcnn.malignancy import open_malignancy_model

            malignancy = open_malignancy_model(
                models_dir / "malignancy", allow_unfinished=allow_unfinished
            )
        config = PipelineConfig.load(models_dir)
        return cls(unet_model, unet_plan, fpr, config, models_dir, model_set, malignancy, fprs[1:])


@dataclass
class DetectionResult:
    """What :func:`detect` found, and how long each stage took."""

    seriesuid: str
    detections: list[Detection]
    candidates: int
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    patient: dict[str, Any] | None = None
    """The patient-level malignancy score (:func:`patient_summary`), with a malignancy stage."""

    @property
    def suspicion(self) -> float:
        """Scan-level suspicion score (the most probable nodule)."""
        return suspicion_score(self.detections)


def to_cache_grid(scan: Scan, plan: PreprocessPlan | None = None) -> CachedScan:
    """The scan on the cache grid (1 mm, world-aligned) with its lung mask, in memory."""
    plan = plan or PreprocessPlan()
    volume, geometry = resample_array(
        scan.array,
        scan.geometry,
        plan.spacing,
        plan.image_interpolation,
        default_value=AIR_HU,
        align_to_world=plan.align_to_world,
    )
    volume = volume.astype(np.int16, copy=False)
    lung = segment_lungs_array(volume, geometry)
    if not lung.any():
        segment_lungs(Scan(volume, geometry, scan.seriesuid, source=scan.source))  # raises
    meta = {"seriesuid": scan.seriesuid, "source": scan.source, "fold": None}
    return CachedScan(scan.seriesuid, volume, lung, geometry, meta)


def score_candidates(
    detector: Detector,
    cached: CachedScan,
    centres: np.ndarray,
    candidate_probability: np.ndarray | None = None,
) -> np.ndarray:
    """The detector's scores of world points of one scan: MGI-CNN probabilities (TTA if the
    config says so); with an ensemble (``fpr2/`` ...), the mean of every member's; mixed with
    ``candidate_probability`` (the U-Net's, one per point) by the config's
    ``candidate_weight`` (:func:`fuse_scores`).

    Raises:
        LungCTError: a set without an MGI-CNN; a set whose ``candidate_weight`` is above 0
            called without ``candidate_probability``.
    """
    from fp_reduction_3dcnn.data import PatchCutter
    from fp_reduction_3dcnn.symmetries import tta_predict

    members = detector.fpr_ensemble
    if not members:
        raise LungCTError(detector.models_dir, "this model set has no MGI-CNN stage to score with")
    if detector.config.candidate_weight > 0 and candidate_probability is None:
        raise LungCTError(
            detector.models_dir,
            f"this model set's score mixes in the U-Net's probability (candidate_weight "
            f"{detector.config.candidate_weight:g} in pipeline.json): pass candidate_probability",
        )
    out = np.zeros(len(centres), dtype=np.float64)
    step = detector.config.batch_size
    for trained in members:
        cutter = PatchCutter(trained.plan, cache=None)

        def predict(inputs: list[np.ndarray], model: Any = trained.model) -> np.ndarray:
            return np.asarray(model.predict_on_batch(inputs)).reshape(-1)

        for start in range(0, len(centres), step):
            inputs = cutter.cut_scan(cached, centres[start : start + step])
            out[start : start + step] += (
                tta_predict(predict, inputs) if detector.config.tta else predict(inputs)
            )
    return fuse_scores(detector.config, candidate_probability, out / len(members))


def fuse_scores(
    config: PipelineConfig, candidate_probability: np.ndarray | None, fpr_probability: np.ndarray
) -> np.ndarray:
    """A mark's score from the U-Net's probability and the MGI-CNNs' mean probability:
    ``w * candidate + (1 - w) * fpr`` with ``w = config.candidate_weight`` (the MGI-CNNs' alone
    when it is 0)."""
    w = float(config.candidate_weight)
    if w == 0.0:
        return np.asarray(fpr_probability, dtype=np.float64)
    if candidate_probability is None or len(candidate_probability) != len(fpr_probability):
        raise ValueError("candidate_probability must give one probability per scored point")
    return w * np.asarray(candidate_probability, dtype=np.float64) + (1.0 - w) * np.asarray(
        fpr_probability, dtype=np.float64
    )


def score_malignancy(
    detector: Detector, cached: CachedScan, detections: list[Detection]
) -> list[Detection]:
    """The detections with the malignancy CNN's probability and rating on those at or above
    the report threshold (the others unchanged)."""
    chosen = [i for i, d in enumerate(detections) if d.probability >= detector.config.threshold]
    if detector.malignancy is None or not chosen:
        return detections
    centres = np.asarray([[detections[i].x, detections[i].y, detections[i].z] for i in chosen])
    scores = detector.malignancy.predict(cached, centres)
    out = list(detections)
    for i, (p, rating) in zip(chosen, scores, strict=True):
        out[i] = replace(out[i], malignancy=float(p), malignancy_rating=float(rating))
    return out


def patient_summary(detections: Sequence[Detection], threshold: float) -> dict[str, Any]:
    """The patient-level malignancy score (:func:`fp_reduction_3dcnn.malignancy.patient_score`)
    as ``summary.json`` and the report state it."""
    from fp_reduction_3dcnn.malignancy import patient_score

    scored = [d for d in detections if d.malignancy is not None]
    score, n = patient_score(
        [d.probability for d in scored], [float(d.malignancy) for d in scored], threshold
    )
    return {
        "score": score,
        "rule": "highest malignancy probability among the marks at or above the threshold",
        "threshold": threshold,
        "nodules": n,
        "note": (
            ""
            if n
            else f"no mark reached the detection threshold {threshold:g}: the score is 0, which "
            "says only that nothing was detected"
        ),
    }


def detect(
    scan_path: str | os.PathLike,
    detector: Detector,
    out_dir: str | os.PathLike,
    report: bool = True,
    allow_training_scans: bool = False,
    log: Callable[[str], None] = print,
    view3d: bool = False,
) -> DetectionResult:
    """Run every stage on one scan; write ``detections.csv``, ``summary.json`` and the report
    (with ``view3d``, also the lungs in 3-D with the marks, ``view3d.png``).

    The outputs are written and checked in a staging folder and published together, with
    ``summary.json`` last (:func:`lungct.fileio.staged_outputs`): a failed write leaves an
    earlier run's outputs in ``out_dir`` as they were, and an earlier report is never left
    beside new detections.

    Raises:
        LungCTError: unreadable scan, no lungs, broken model folders, or (unless
            ``allow_training_scans``) a scan the MGI-CNN was trained on.
        lungct.fileio.WriteError: an output cannot be written whole (full disk, read-only
            folder).
    """
    from unet_candidates import extract_candidates
    from unet_candidates.runtime import runtime_of

    out = Path(out_dir)
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[name] = round(now - t, 2)
        t = now
        log(f"[detect] {name}: {timings[name]:.1f} s")

    scan = read_scan(scan_path)
    lap("read")
    if not allow_training_scans:
        trained_on = {
            "MGI-CNN": [
                uid
                for trained in detector.fpr_ensemble
                for uid in getattr(trained.manifest, "train_series", None) or []
            ],
            "malignancy CNN": (
                detector.malignancy.manifest.get("train_series", []) if detector.malignancy else []
            ),
        }
        for stage, series in trained_on.items():
            if scan.seriesuid in set(series or []):
                raise LungCTError(
                    scan_path,
                    f"this scan was in the {stage}'s training set; its scores would be "
                    "optimistic (pass --allow-training-scans to run anyway)",
                )
    cached = to_cache_grid(scan)
    lap("resample + lung mask")
    candidates = extract_candidates(cached, detector.unet_model, detector.unet_plan)
    lap(f"U-Net candidates ({len(candidates)})")
    centres = np.asarray([[c.coordX, c.coordY, c.coordZ] for c in candidates], dtype=np.float64)
    probs = np.asarray([c.probability for c in candidates], dtype=np.float64)  # the U-Net's
    if detector.fpr is not None and len(centres):
        probs = score_candidates(detector, cached, centres, probs)
        lap("MGI-CNN scores")
    detections = [
        Detection(float(x), float(y), float(z), float(p), float(c.diameter_mm))
        for (x, y, z), p, c in zip(centres, probs, candidates, strict=True)
    ]
    detections.sort(key=lambda d: -d.probability)
    patient = None
    if detector.malignancy is not None:
        detections = score_malignancy(detector, cached, detections)
        lap("malignancy")
        patient = patient_summary(detections, detector.config.threshold)
    with staged_outputs(out, OUTPUT_MARKER, stale=REPORT_OUTPUTS) as stage:
        write_csv_atomic(
            stage / "detections.csv",
            DETECTION_COLUMNS,
            ([scan.seriesuid, d.x, d.y, d.z, d.probability, d.diameter_mm] for d in detections),
        )
        if report:
            write_report(
                scan,
                detections,
                stage,
                lung=cached.lung,
                lung_geometry=cached.geometry,
                threshold=detector.config.threshold,
                timings=timings,
                model_set=model_set_facts(detector.model_set) if detector.model_set else None,
                warning=detector.model_set.warning() if detector.model_set else None,
                tta=detector.config.tta if detector.fpr is not None else None,
                view3d=view3d,
                patient=patient,
                candidate_weight=detector.candidate_weight,
            )
            lap("report")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result = DetectionResult(
            scan.seriesuid, detections, len(candidates), timings, peak, patient
        )
        write_json_atomic(
            stage / OUTPUT_MARKER,
            {
                "seriesuid": scan.seriesuid,
                "scan": str(scan_path),
                "models": str(detector.models_dir),
                "model_set": detector.model_set.summary() if detector.model_set else None,
                "unet_runtime": runtime_of(detector.unet_model),
                "candidates": len(candidates),
                "detections_above_threshold": sum(
                    d.probability >= detector.config.threshold for d in detections
                ),
                "threshold": detector.config.threshold,
                "candidate_weight": detector.candidate_weight,
                "suspicion": result.suspicion,
                "patient": patient,
                "nodules": [
                    {
                        "x": d.x,
                        "y": d.y,
                        "z": d.z,
                        "probability": d.probability,
                        "malignancy": d.malignancy,
                        "malignancy_rating": d.malignancy_rating,
                    }
                    for d in detections
                    if d.malignancy is not None
                ],
                "seconds": timings,
                "total_seconds": round(sum(timings.values()), 2),
                "peak_rss_mb": round(peak, 1),
            },
        )
    return result
