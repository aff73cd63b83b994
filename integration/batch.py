"""The detector on many scans: ``python -m integration detect --scans DIR|LIST.csv --out OUT``.

The scans are a folder (searched with its subfolders but LUNA16's ``seg-lungs*`` masks:
``.mhd``/``.mha``/``.nii``/``.nii.gz`` files, and every folder holding DICOM files is one series) or a CSV listing one scan per row
(a path, relative to the CSV's folder or absolute; a header row ``path`` or ``scan`` names the
column, otherwise the first one is used). Each scan runs through :func:`integration.pipeline.detect`
exactly as ``detect --scan`` runs it, one scan at a time per worker: in this process, or with
``--ray`` as one Ray task per scan on actors that load the models once
(:mod:`lungct.raypool`). What it writes::

    OUT/batch.json               the model set (its weights' checksums) and TTA of the run
    OUT/scans/<seriesuid>/       each scan's outputs as ``detect --scan`` writes them
                                 (detections.csv, summary.json, report.html with its figures)
    OUT/detections.csv           every finished scan's detections in the LUNA16 submission
                                 format: seriesuid,coordX,coordY,coordZ,probability (world mm)
    OUT/failures.csv             scan,seriesuid,reason: each scan that failed, in one line

Nothing is lost to a kill or a full disk: a scan's folder is published whole with its
``summary.json`` last (:func:`lungct.fileio.staged_outputs`), and the two tables are rebuilt
from the finished scans' folders and replace the old ones atomically, as scans finish (at most
every :data:`TABLE_INTERVAL_S` seconds) and when the run ends.

A re-run on the same OUT resumes: a scan whose folder is complete (from the same path) is not
run again; nor is one that failed before, unless ``--retry-failed``. A run with another model
set or TTA setting than OUT's ``batch.json`` is refused, so the tables never mix two
detectors. A scan that fails (unreadable, no lungs, a training scan of the MGI-CNN, a worker
that died under it) is written to ``failures.csv`` and the others go on; an output that cannot
be written (a full disk) stops the run, as every other scan would fail the same way.

The command's exit status: 0 every scan is done, 1 some failed (``failures.csv`` says why), 2
bad command-line input (no such folder, no scan found, a broken model set, Ray missing or
unreachable, an output folder that cannot be written).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lungct.errors import LungCTError
from lungct.fileio import WriteError, read_json, write_json_atomic, write_text_atomic
from lungct.io import scan_suffix, series_uid_from_path
from lungct.raypool import RayOptions, WorkerLost, one_line

if TYPE_CHECKING:
    from integration.modelset import ModelSet
    from integration.pipeline import Detector

BATCH_FILE = "batch.json"
SCANS_DIR = "scans"
DETECTIONS_FILE = "detections.csv"
FAILURES_FILE = "failures.csv"
SUBMISSION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
"""The LUNA16 submission format of ``OUT/detections.csv`` (world mm)."""
FAILURE_COLUMNS = ("scan", "seriesuid", "reason")
BATCH_FORMAT = 1
TABLE_INTERVAL_S = 5.0
"""The tables are rebuilt at most this often while scans finish (and always at the end)."""

_COMPANIONS = (".raw", ".zraw", ".img", ".hdr")
"""Pixel files beside a header: never a scan of their own."""
_MASK_FOLDERS = ("seg-lungs",)
"""Folders of lung masks beside the scans (LUNA16's seg-lungs-LUNA16, ``lungct synth
--lung-masks``): masks named like the scans, never scans."""
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class BatchScan:
    """One scan of a batch: its absolute path and the series UID its outputs are filed under
    (the file name without its suffix; a DICOM folder's SeriesInstanceUID)."""

    path: Path
    seriesuid: str

    @property
    def folder(self) -> str:
        """The scan's folder name under ``OUT/scans`` (the series UID, made safe as a name)."""
        name = _SAFE.sub("_", self.seriesuid) or "_"
        return "_" + name if name.startswith(".") else name


@dataclass(frozen=True)
class BatchOptions:
    """How every scan is detected: the ``detect`` options that apply to each scan."""

    models: str | None = None
    runtime: str | None = None
    threshold: float | None = None
    tta: bool = False
    report: bool = True
    view3d: bool = False
    allow_training_scans: bool = False
    allow_unfinished: bool = False
    retry_failed: bool = False


@dataclass
class ScanOutcome:
    """What became of one scan: done (``reason`` None) or failed, and how long it took."""

    scan: BatchScan
    seconds: float
    detections: int = 0
    above_threshold: int = 0
    threshold: float = 0.5
    reason: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the scan's outputs were written."""
        return self.reason is None


@dataclass
class BatchResult:
    """A batch run: what was done now, earlier, and what failed (this run's scans only)."""

    out: Path
    scans: int
    done_now: list[str] = field(default_factory=list)
    done_before: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    failed_before: dict[str, str] = field(default_factory=dict)
    detections: int = 0
    seconds: float = 0.0
    warning: str | None = None

    @property
    def exit_status(self) -> int:
        """0 when every scan is done, 1 when some failed."""
        return 1 if self.failed or self.failed_before else 0


# ----------------------------------------------------------------------------------------------
# Finding the scans
# ----------------------------------------------------------------------------------------------


def find_batch_scans(
    source: str | os.PathLike, exclude: str | os.PathLike | None = None
) -> list[BatchScan]:
    """The scans of a folder (with its subfolders) or of a CSV list, in a stable order.

    In a folder: every ``.mhd``/``.mha``/``.nii``/``.nii.gz`` file, and every folder holding a
    DICOM file (``.dcm``, or the DICM mark at byte 128) as one series; hidden folders, lung
    mask folders (``seg-lungs*``) and ``exclude`` (the output folder) are skipped. In a CSV: one path per row (see the module
    docstring); a listed path that does not exist is kept, and fails when it is read.

    Raises:
        LungCTError: ``source`` is missing, neither a folder nor a ``.csv``, or lists no scan.
    """
    source = Path(source)
    if not source.exists():
        raise LungCTError(source, "no such folder or scan list")
    if source.is_dir():
        paths = list(_scans_in_folder(source, None if exclude is None else Path(exclude)))
        what = "no scans found (.mhd, .mha, .nii, .nii.gz or DICOM series folders)"
    elif source.suffix.lower() == ".csv":
        paths = _scans_in_list(source)
        what = "lists no scans"
    else:
        raise LungCTError(source, "--scans takes a folder of scans or a .csv list of scan paths")
    if not paths:
        raise LungCTError(source, what)
    return [BatchScan(p, _seriesuid(p)) for p in paths]


def _scans_in_folder(root: Path, exclude: Path | None) -> Iterator[Path]:
    skip = exclude.resolve() if exclude is not None else None
    for folder, subfolders, files in os.walk(root):
        here = Path(folder).resolve()
        subfolders[:] = sorted(
            d
            for d in subfolders
            if not d.startswith(".")
            and not d.lower().startswith(_MASK_FOLDERS)
            and (here / d).resolve() != skip
        )
        dicom = False
        for name in sorted(files):
            if scan_suffix(name):
                yield here / name
            elif not dicom and not name.lower().endswith(_COMPANIONS):
                dicom = _is_dicom(here / name)
        if dicom:
            yield here


def _is_dicom(path: Path) -> bool:
    if path.name.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _scans_in_list(path: Path) -> list[Path]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LungCTError(path, f"cannot be read as a CSV list of scans ({exc})") from None
    column = 0
    if rows:
        header = [cell.strip().lower() for cell in rows[0]]
        names = [n for n in ("path", "scan") if n in header]
        if names:
            column = header.index(names[0])
            rows = rows[1:]
    paths = []
    for row in rows:
        cell = row[column].strip() if column < len(row) else ""
        if not cell or cell.startswith("#"):
            continue
        p = Path(cell).expanduser()
        paths.append((p if p.is_absolute() else path.parent / p).resolve())
    return paths


def _seriesuid(path: Path) -> str:
    """The series UID :func:`lungct.io.read_scan` will give (read from a DICOM header; for a
    folder whose header cannot be read, the folder's name: reading it then says why)."""
    if path.is_dir():
        from lungct.dicom import series_uid_of_folder

        return series_uid_of_folder(path) or path.name
    return series_uid_from_path(path)


# ----------------------------------------------------------------------------------------------
# One scan
# ----------------------------------------------------------------------------------------------


def load_detector(options: BatchOptions, threads: int | None = None) -> Detector:
    """The :class:`integration.pipeline.Detector` the options name, with their threshold and
    TTA applied (as ``detect --scan`` applies them)."""
    from integration.pipeline import Detector

    detector = Detector.load(
        options.models,
        runtime=options.runtime,
        allow_unfinished=options.allow_unfinished,
        threads=threads,
    )
    if options.threshold is not None:
        detector.config.threshold = options.threshold
    if options.tta:
        detector.config.tta = True
    return detector


def detect_one(
    detector: Detector, scan: BatchScan, out: str | os.PathLike, options: BatchOptions
) -> ScanOutcome:
    """Detect one scan into ``out/scans/<seriesuid>``; a failure becomes the outcome's reason.

    Raises:
        lungct.fileio.WriteError: an output cannot be written (the whole batch stops).
    """
    from integration.pipeline import detect

    t0 = time.perf_counter()
    threshold = detector.config.threshold
    try:
        result = detect(
            scan.path,
            detector,
            Path(out) / SCANS_DIR / scan.folder,
            report=options.report,
            view3d=options.view3d,
            allow_training_scans=options.allow_training_scans,
            log=_quiet,
        )
    except WriteError:
        raise
    except Exception as exc:  # one bad scan must not stop the others
        return ScanOutcome(scan, time.perf_counter() - t0, reason=one_line(exc))
    return ScanOutcome(
        scan,
        time.perf_counter() - t0,
        detections=len(result.detections),
        above_threshold=sum(d.probability >= threshold for d in result.detections),
        threshold=threshold,
    )


def _quiet(message: str) -> None:
    """Per-stage timings stay in each scan's summary.json."""


class DetectWorker:
    """A Ray actor's state: the detector, loaded once, then one scan per :meth:`run`.

    A worker runs on one CPU (:data:`lungct.raypool.WORKER_ENV`), so ONNX Runtime gets one
    thread too.
    """

    def __init__(self, options: BatchOptions, out: str) -> None:
        from lungct.quiet import quiet_tensorflow

        quiet_tensorflow()
        self.options, self.out = options, out
        self.detector: Detector | None = None
        self.error: str | None = None
        try:
            self.detector = load_detector(options, threads=1)
        except Exception as exc:  # reported by ready(): the actor itself must start
            self.error = one_line(exc)

    def ready(self) -> str | None:
        """None once the models are loaded, else why they could not be."""
        return self.error

    def run(self, scan: BatchScan) -> ScanOutcome:
        """Detect one scan (see :func:`detect_one`)."""
        return detect_one(self.detector, scan, self.out, self.options)


# ----------------------------------------------------------------------------------------------
# The batch
# ----------------------------------------------------------------------------------------------


def run_batch(
    source: str | os.PathLike,
    out: str | os.PathLike,
    options: BatchOptions | None = None,
    ray: RayOptions | None = None,
    log: Callable[[str], None] | None = None,
) -> BatchResult:
    """Detect every scan of ``source`` into ``out`` (see the module docstring), in this
    process or on Ray (``ray``); ``log`` gets one line per finished scan (default: stderr).

    Raises:
        LungCTError: no scans, a broken model set, an output folder of another model set,
            Ray missing or unreachable; :class:`lungct.fileio.WriteError` when an output cannot
            be written.
    """
    from integration.pipeline import open_model_set

    options = options or BatchOptions()
    log = log or _stderr
    if ray is not None:
        from lungct.raypool import import_ray

        import_ray(ray)  # a missing Ray is said before anything is read or written
    t_start = time.perf_counter()
    out = Path(out)
    scans = find_batch_scans(source, exclude=out)
    model_set = open_model_set(options.models, allow_unfinished=options.allow_unfinished)
    _claim_output(out, model_set, options)

    tables = _Tables(out)
    result = BatchResult(out, len(scans), warning=model_set.warning())
    todo: list[BatchScan] = []
    seen: dict[str, BatchScan] = {}
    for scan in scans:
        key = str(scan.path)
        first = seen.setdefault(scan.folder, scan)
        if first is not scan:
            result.failed[key] = (
                f"{scan.path}: series {scan.seriesuid} is also {first.path}; each series is "
                "detected once"
            )
            tables.failures[key] = (scan.seriesuid, result.failed[key])
            continue
        finished = tables.finished_scan(scan.folder)
        if finished == key:
            result.done_before.append(scan.seriesuid)
            tables.failures.pop(key, None)
        elif finished is not None:
            result.failed[key] = (
                f"{scan.path}: {out / SCANS_DIR / scan.folder} holds the outputs of {finished} "
                "(same series UID); remove that folder to detect this scan"
            )
            tables.failures[key] = (scan.seriesuid, result.failed[key])
        elif key in tables.failures and not options.retry_failed:
            result.failed_before[key] = tables.failures[key][1]
        else:
            tables.failures.pop(key, None)
            todo.append(scan)
    log(
        f"[batch] {len(scans)} scans: {len(result.done_before)} done earlier, "
        f"{len(result.failed_before)} failed earlier"
        + (" (--retry-failed tries them again)" if result.failed_before else "")
        + (f", {len(result.failed)} refused" if result.failed else "")
        + f", {len(todo)} to do"
        + (" on Ray" if ray is not None and todo else "")
    )
    try:
        for n, outcome in enumerate(_outcomes(todo, out, options, ray, log), start=1):
            key = str(outcome.scan.path)
            if outcome.ok:
                result.done_now.append(outcome.scan.seriesuid)
                tables.add_finished(outcome.scan.folder)
                log(
                    f"[batch] {n}/{len(todo)} {outcome.scan.seriesuid}: {outcome.seconds:.1f} s, "
                    f"{outcome.detections} marks, {outcome.above_threshold} at or above "
                    f"{outcome.threshold:g}"
                )
            else:
                result.failed[key] = outcome.reason or "failed"
                tables.failures[key] = (outcome.scan.seriesuid, result.failed[key])
                log(
                    f"[batch] {n}/{len(todo)} {outcome.scan.seriesuid}: failed after "
                    f"{outcome.seconds:.1f} s: {outcome.reason}"
                )
            tables.publish(force=False)
    finally:
        tables.publish(force=True)
    result.detections = tables.rows_total()
    result.seconds = time.perf_counter() - t_start
    return result


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _outcomes(
    todo: Sequence[BatchScan],
    out: Path,
    options: BatchOptions,
    ray_options: RayOptions | None,
    log: Callable[[str], None],
) -> Iterator[ScanOutcome]:
    """Each scan's outcome as it finishes: one after the other here, or on Ray actors."""
    if not todo:
        return
    if ray_options is None:
        detector = load_detector(options)
        for scan in todo:
            yield detect_one(detector, scan, out, options)
        return
    from lungct.raypool import ray_runtime, stream_on_actors, worker_count

    with ray_runtime(ray_options) as ray:
        workers = worker_count(ray, ray_options, len(todo))
        log(f"[batch] {workers} Ray workers are loading the models")
        for scan, outcome in stream_on_actors(
            ray, DetectWorker, (options, str(out)), todo, workers
        ):
            if isinstance(outcome, WorkerLost):
                yield ScanOutcome(scan, 0.0, reason=f"{scan.path}: {outcome.reason}")
            else:
                yield outcome


def _claim_output(out: Path, model_set: ModelSet, options: BatchOptions) -> None:
    """Write ``OUT/batch.json`` on first use; refuse an OUT made with another detector."""
    weights = {
        stage: (manifest.get("files") or {}).get("model.keras")
        for stage, manifest in model_set.manifests.items()
    }
    claim = {
        "format": BATCH_FORMAT,
        "model_set": model_set.name,
        "version": model_set.version,
        "models": str(Path(model_set.root).resolve()),
        "weights": weights,
        "tta": bool(options.tta) or _set_tta(model_set.root),
        "candidate_weight": _set_candidate_weight(model_set),
    }
    path = out / BATCH_FILE
    if path.is_file():
        old = read_json(path)
        if not isinstance(old, dict):
            raise LungCTError(path, "is not a batch description (a JSON object)")
        same_weights = (all(weights.values()) and old.get("weights") == weights) or old.get(
            "models"
        ) == claim["models"]
        same_score = old.get("candidate_weight", 0.0) == claim["candidate_weight"]
        if not same_weights or old.get("tta") != claim["tta"] or not same_score:
            raise LungCTError(
                out,
                f"holds the detections of model set {old.get('model_set')!r} "
                f"(tta {old.get('tta')}, candidate_weight {old.get('candidate_weight', 0.0)}), "
                f"not of {claim['model_set']!r} (tta {claim['tta']}, candidate_weight "
                f"{claim['candidate_weight']}); use another --out",
            )
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(out, f"cannot create the output folder ({exc.strerror or exc})") from None
    write_json_atomic(path, claim)


def _set_tta(models_root: Path) -> bool:
    from integration.pipeline import PipelineConfig

    return bool(PipelineConfig.load(models_root).tta)


def _set_candidate_weight(model_set: ModelSet) -> float:
    """The set's share of the U-Net's probability in the score (0 without an MGI-CNN, where
    the U-Net's probability is the whole score)."""
    from integration.modelset import fpr_stages
    from integration.pipeline import PipelineConfig

    if not fpr_stages(model_set.stages):
        return 0.0
    return float(PipelineConfig.load(model_set.root).candidate_weight)


class _Tables:
    """``detections.csv`` and ``failures.csv`` of OUT, kept in memory and rebuilt whole.

    The detections are those of every finished scan folder under ``OUT/scans`` (read once
    each), each scan's rows kept as their CSV text: about 170 bytes a detection with the
    bookkeeping (as lists of strings they took three times that). The failures start as the
    earlier run's ``failures.csv``. A table whose content has not changed is not written again
    (a run with nothing to do changes no file).
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        self.sources: dict[str, str] = {}
        self.failures: dict[str, tuple[str, str]] = _read_failures(out / FAILURES_FILE)
        self.last = time.monotonic()
        root = out / SCANS_DIR
        if root.is_dir():
            for folder in sorted(p.name for p in root.iterdir() if p.is_dir()):
                self.add_finished(folder, just_written=False)

    def finished_scan(self, folder: str) -> str | None:
        """The scan path whose complete outputs fill ``OUT/scans/<folder>``, or None."""
        return self.sources.get(folder)

    def add_finished(self, folder: str, just_written: bool = True) -> None:
        """Read a finished scan folder's detections. An incomplete or unreadable folder is
        left out (and its scan run again), unless it was ``just_written``: then it is an
        error."""
        entry = self.out / SCANS_DIR / folder
        try:
            summary = json.loads((entry / "summary.json").read_text())
            with open(entry / DETECTIONS_FILE, newline="") as f:
                rows = list(csv.reader(f))
            if not rows or tuple(rows[0][:5]) != SUBMISSION_COLUMNS:
                raise ValueError(f"{DETECTIONS_FILE} is not a detections table")
            source = str(summary["scan"])
        except (OSError, ValueError, KeyError, TypeError, csv.Error) as exc:
            if just_written:
                raise LungCTError(entry, f"cannot be read back ({exc})") from None
            return
        kept = [r[:5] for r in rows[1:] if len(r) >= 5]
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(kept)
        self.rows[folder] = buffer.getvalue()
        self.counts[folder] = len(kept)
        self.sources[folder] = source

    def rows_total(self) -> int:
        """Detections in ``detections.csv``."""
        return sum(self.counts.values())

    def publish(self, force: bool) -> None:
        """Rebuild both tables (now when ``force``, else at most every TABLE_INTERVAL_S)."""
        if not force and time.monotonic() - self.last < TABLE_INTERVAL_S:
            return
        _write_text_if_changed(
            self.out / DETECTIONS_FILE,
            _csv_text([SUBMISSION_COLUMNS]) + "".join(self.rows[f] for f in sorted(self.rows)),
        )
        _write_text_if_changed(
            self.out / FAILURES_FILE,
            _csv_text(
                [FAILURE_COLUMNS]
                + [[scan, uid, reason] for scan, (uid, reason) in sorted(self.failures.items())]
            ),
        )
        self.last = time.monotonic()


def _csv_text(rows: Iterable[Sequence]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _write_text_if_changed(path: Path, text: str) -> None:
    try:
        if path.read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    write_text_atomic(path, text)


def _read_failures(path: Path) -> dict[str, tuple[str, str]]:
    """An earlier ``failures.csv``: ``{scan path: (seriesuid, reason)}`` (none if absent)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        return {}
    except (OSError, csv.Error) as exc:
        raise LungCTError(path, f"cannot be read ({exc})") from None
    if not rows or tuple(rows[0]) != FAILURE_COLUMNS:
        raise LungCTError(path, f"is not a failures table (header {list(FAILURE_COLUMNS)})")
    return {r[0]: (r[1], r[2]) for r in rows[1:] if len(r) == len(FAILURE_COLUMNS)}
