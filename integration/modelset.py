"""A model set: the trained stages ``detect`` runs, with what they are and how they were made.

A models folder is::

    DIR/modelset.json   name, version, description, the stages it holds (format-versioned)
    DIR/MODEL_CARD.md   intended use, training data, measured numbers, known limitations
    DIR/pipeline.json   report threshold, TTA and the U-Net's share of the score (optional,
                        see PipelineConfig)
    DIR/unet/           a sealed U-Net model folder (lungct.modeldir)
    DIR/fpr/            a sealed MGI-CNN model folder
    DIR/fpr2/ .. fpr9/  more sealed MGI-CNN folders (optional): the candidates' score is then
                        the mean of every ``fpr*`` network's probability (an ensemble)
    DIR/malignancy/     a sealed malignancy CNN folder (optional)

:func:`read_model_set` checks all of it before a weight is loaded: the set's format and shape,
that every stage it lists is there, and each stage's seal (training ended, file checksums, the
trained plan, manifest format and shape; :func:`lungct.modeldir.verify_model_dir`). The suite's
own set lives in :data:`SHIPPED_MODELS`; ``integration detect`` uses it when no ``--models``
is given. ``python -m integration modelset`` writes ``modelset.json`` and the card for a folder
of stages trained by hand.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lungct.errors import LungCTError
from lungct.fileio import read_json, write_json_atomic, write_text_atomic
from lungct.modeldir import UnfinishedModelError, is_demo_grade, is_sealed, verify_model_dir
from lungct.plans import check_format_version, check_value_types

MODELSET_FILE = "modelset.json"
MODEL_CARD_FILE = "MODEL_CARD.md"
MODELSET_FORMAT = 1
DETECTOR_STAGES = ("unet", "fpr", "malignancy")
"""Stages the detector can run, in order; ``unet`` is required, ``fpr`` rescoring and
``malignancy`` scoring of the reported marks optional."""
FPR_STAGE = re.compile(r"fpr([2-9])?\Z")
"""Names of false-positive-reduction stages: ``fpr`` and the ensemble's further members
``fpr2`` .. ``fpr9`` (each a folder of its own; the scores are their mean)."""
SHIPPED_MODELS = Path(__file__).resolve().parent / "shipped_models"
"""The model set that ships with the suite (``integration detect`` without ``--models``)."""
MODELSET_TYPES: dict[str, Any] = {
    "format": int,
    "name": str | None,
    "version": str | None,
    "description": str | None,
    "stages": list[str],
    "written": str | None,
}
"""JSON types of the keys of ``modelset.json``."""


def stage_kind(stage: str) -> str:
    """The kind of model a set's stage holds: ``fpr`` for every member of an ensemble."""
    return "fpr" if FPR_STAGE.match(stage) else stage


def fpr_stages(stages: list[str]) -> list[str]:
    """The false-positive-reduction stages of a set, ``fpr`` first (empty without one)."""
    return sorted((s for s in stages if FPR_STAGE.match(s)), key=lambda s: (len(s), s))


def _stage_order(stages: list[str]) -> list[str]:
    return sorted(stages, key=lambda s: (DETECTOR_STAGES.index(stage_kind(s)), len(s), s))


@dataclass
class ModelSet:
    """What :func:`read_model_set` found: the set's description and each stage's manifest."""

    root: Path
    name: str
    version: str
    description: str
    stages: list[str]
    manifests: dict[str, dict] = field(default_factory=dict)

    @property
    def unfinished(self) -> list[str]:
        """Stages whose training has not ended (loaded with ``allow_unfinished``)."""
        return [s for s in self.stages if not is_sealed(self.manifests.get(s, {}))]

    @property
    def demo_grade(self) -> bool:
        """True when any stage was trained for minutes or on small synthetic data."""
        return any(is_demo_grade(m) for m in self.manifests.values())

    @property
    def train_seconds(self) -> float:
        """Training wall time of every stage together."""
        return float(
            sum(
                (m.get("provenance") or {}).get("train_seconds") or 0.0
                for m in self.manifests.values()
            )
        )

    @property
    def trained_on(self) -> str:
        """The training data of every stage, in words (one phrase per distinct data set)."""
        phrases: list[str] = []
        for manifest in self.manifests.values():
            phrase = data_phrase((manifest.get("provenance") or {}).get("data") or {})
            if phrase not in phrases:
                phrases.append(phrase)
        return "; ".join(phrases)

    def summary(self) -> dict[str, Any]:
        """The set as ``summary.json`` and the report name it."""
        return {
            "name": self.name,
            "version": self.version,
            "path": str(self.root),
            "stages": list(self.stages),
            "trained_on": self.trained_on,
            "train_hours": round(self.train_seconds / 3600.0, 2),
            "demo_grade": self.demo_grade,
        }

    def warning(self) -> str | None:
        """One line for stderr and the report when the set is demo-grade or unfinished, else
        None."""
        if self.unfinished:
            return (
                f"model set '{self.name}': the training of {', '.join(self.unfinished)} did not "
                "finish (allowed by --allow-unfinished): its marks are not a finished model's"
            )
        if not self.demo_grade:
            return None
        minutes = self.train_seconds / 60.0
        return (
            f"model set '{self.name}' is a demo-grade training ({minutes:.0f} min on "
            f"{self.trained_on}): its marks are for learning the suite, not for reading scans"
        )


def data_phrase(data: dict) -> str:
    """``{"kind": "synthetic", "size": "full", "scans": 120, ...}`` -> readable words."""
    kind = data.get("kind")
    if kind == "merged":
        return " + ".join(data_phrase(part) for part in data.get("parts") or [])
    if kind == "synthetic":
        made = f"seed {data.get('seed')}, generator v{data.get('generator_version')}"
        if data.get("background"):
            return (
                f"{data.get('scans')} copies of the real scan {data['background']} with "
                f"synthetic nodules in its lungs ({made})"
            )
        return f"{data.get('scans')} synthetic {data.get('size')} scans ({made})"
    if kind == "LUNA16 layout":
        scans = f"{data['scans']} scans of " if data.get("scans") is not None else ""
        return f"{scans}the data folder '{data.get('name')}'"
    return "unknown data"


def read_model_set(models_dir: str | os.PathLike, allow_unfinished: bool = False) -> ModelSet:
    """Check a models folder (set format, stages present, every stage's seal) and describe it.

    ``allow_unfinished`` accepts stages whose training has not ended (no seal).

    Raises:
        LungCTError: no such folder, no ``modelset.json``, a newer format, a description of
            the wrong shape, a listed stage missing, or a stage whose seal does not hold.
    """
    root = Path(models_dir)
    if not root.is_dir():
        raise LungCTError(root, "models folder does not exist")
    path = root / MODELSET_FILE
    info = read_json(
        path,
        f"no {MODELSET_FILE}: not a model set (describe a folder of trained stages with "
        "`python -m integration modelset --models DIR --name NAME`)",
        missing_where=root,
    )
    if not isinstance(info, dict):
        raise LungCTError(path, "a model set description must be a JSON object")
    check_format_version(info.get("format"), MODELSET_FORMAT, path, "model set format")
    check_value_types({k: v for k, v in MODELSET_TYPES.items() if k != "stages"}, info, path)
    stages = info.get("stages")
    if not isinstance(stages, list) or "unet" not in stages:
        raise LungCTError(path, f"stages must be a list holding 'unet', got {stages!r}")
    check_value_types({"stages": list[str]}, {"stages": stages}, path)
    unknown = sorted(s for s in stages if stage_kind(s) not in DETECTOR_STAGES)
    if unknown:
        raise LungCTError(
            path, f"unknown stages {unknown} (known: {list(DETECTOR_STAGES)}, fpr2 .. fpr9)"
        )
    if len(set(stages)) != len(stages):
        raise LungCTError(path, f"a stage is listed twice in {stages}")
    if fpr_stages(stages) and "fpr" not in stages:
        raise LungCTError(path, f"{fpr_stages(stages)[0]} is listed without fpr")
    manifests = {}
    for stage in stages:
        if not (root / stage).is_dir():
            raise LungCTError(root, f"the model set lists a {stage}/ stage but the folder has none")
        manifests[stage] = verify_model_dir(
            root / stage, allow_unfinished=allow_unfinished, stage=stage_kind(stage)
        )
    return ModelSet(
        root=root,
        name=str(info.get("name") or root.name),
        version=str(info.get("version") or ""),
        description=str(info.get("description") or ""),
        stages=list(stages),
        manifests=manifests,
    )


def write_model_set(
    models_dir: str | os.PathLike,
    name: str,
    version: str = "",
    description: str = "",
    performance: str = "",
    limitations: str = "",
    threshold_note: str = "",
) -> ModelSet:
    """Describe a folder of trained (sealed) stages as a model set: ``modelset.json`` + card.

    The stages are the detector stages present as folders (``unet/`` required; every
    ``fpr``, ``fpr2`` .. ``fpr9`` folder, an ensemble whose scores are averaged). The card is
    made from the stages' manifests; ``performance`` and ``limitations`` are Markdown written
    into it as they are (measured numbers, with the data and command that gave them).

    Raises:
        LungCTError: no ``unet/``, or a stage whose seal does not hold.
    """
    root = Path(models_dir)
    stray = sorted(  # a member that would be left out: fpr0/, fpr1/, fpr10/ ...
        p.name
        for p in root.glob("fpr*")
        if p.is_dir() and re.fullmatch(r"fpr\d+", p.name) and not FPR_STAGE.match(p.name)
    )
    if stray:
        raise LungCTError(root / stray[0], "not a stage name: fpr/ and fpr2/ .. fpr9/ are")
    names = [*DETECTOR_STAGES, *(f"fpr{k}" for k in range(2, 10))]
    stages = _stage_order([s for s in names if (root / s).is_dir()])
    if fpr_stages(stages) and "fpr" not in stages:
        raise LungCTError(root, f"a {fpr_stages(stages)[0]}/ folder without fpr/")
    if "unet" not in stages:
        raise LungCTError(root, "no unet/ model folder: a model set needs at least the U-Net")
    info = {
        "format": MODELSET_FORMAT,
        "name": name,
        "version": version,
        "description": description,
        "stages": stages,
        "written": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    for stage in stages:  # refuse to describe a set whose stages do not hold
        try:
            verify_model_dir(root / stage, stage=stage_kind(stage))
        except UnfinishedModelError as exc:
            raise LungCTError(
                exc.path,
                "the manifest is not sealed: training did not finish (continue it with `train "
                "--resume`); a model set holds finished stages only",
            ) from None
    write_json_atomic(root / MODELSET_FILE, info)
    model_set = read_model_set(root)
    write_text_atomic(
        root / MODEL_CARD_FILE, model_card(model_set, performance, limitations, threshold_note)
    )
    return model_set


_STAGE_NAMES = {
    "unet": "U-Net candidates",
    "fpr": "MGI-CNN false-positive reduction",
    "malignancy": "malignancy CNN",
}


def stage_title(stage: str) -> str:
    """A stage's name in words; an ensemble member's says which (``fpr2``: member 2)."""
    kind = stage_kind(stage)
    title = _STAGE_NAMES.get(kind, stage)
    if kind == "fpr" and stage != "fpr":
        title += f", member {stage[3:]} ({stage}/)"
    return title


def _ensemble_lines(stages: list[str]) -> list[str]:
    """The model card's words on an ensemble of false-positive reducers, if the set has one."""
    members = fpr_stages(stages)
    if len(members) < 2:
        return []
    folders = ", ".join(f"`{s}/`" for s in members)
    return [
        f"The false-positive reduction is an ensemble of {len(members)} networks ({folders}), "
        "trained apart: a candidate's score is the mean of their probabilities.",
        "",
    ]


def _int8_lines(unet_dir: Path) -> list[str]:
    """The model card's words on the U-Net's 8-bit copy, if the set has a fitting one."""
    from unet_candidates.runtime import INT8_FILE, INT8_RECORD, int8_problem

    if int8_problem(unet_dir) is not None:
        return []
    calibration = read_json(unet_dir / INT8_RECORD).get("calibration") or {}
    return [
        f"On a CPU the U-Net runs as its 8-bit copy, `unet/{INT8_FILE}` (ONNX Runtime static",
        f"quantization calibrated on {len(calibration.get('series') or [])} scans, "
        f"{calibration.get('batches')} batches; `unet/{INT8_RECORD}`",
        "names them and the `model.keras` it was made from); `detect --runtime onnx` runs the",
        "float32 network instead.",
        "",
    ]


def _plan_name(manifest: dict) -> str:
    """The plan a stage was trained with: the manifest's name for it, else the trained plan's."""
    return str(manifest.get("plan") or (manifest.get("trained_plan") or {}).get("name") or "")


def _convergence_cell(folder: Path) -> str:
    """The card's "converged" cell of one stage (:func:`lungct.training.convergence`)."""
    from lungct.training import convergence

    found = convergence(folder)
    if found is None:
        return "-"
    verdict = "yes" if found["plateau"] else "no"
    gain = 100 * found["gain"]
    change = f"{gain:.1f} % lower" if gain >= 0 else f"{-gain:.1f} % higher"
    return (
        f"{verdict}: best of the last quarter of {found['epochs']} epochs {change} than "
        f"before it (ended by its {found['ended_by']})"
    )


def _threshold_lines(root: Path, note: str, stages: list[str] | None = None) -> list[str]:
    """The card's report-threshold paragraph (from ``pipeline.json``)."""
    from integration.pipeline import PipelineConfig

    if not (root / "pipeline.json").is_file():
        return []
    config = PipelineConfig.load(root)
    text = (
        f"Report threshold {config.threshold:.3f} (`pipeline.json`): `detect` reports the marks "
        "that score at or above it as findings and lists the others below them."
    )
    lines = [text + (f" {note.strip()}" if note.strip() else ""), ""]
    if config.candidate_weight > 0 and fpr_stages(stages or []):
        w = config.candidate_weight
        lines[:0] = [
            f"A mark's score (`candidate_weight` {w:g} in `pipeline.json`): {w:g} times the "
            f"U-Net's own probability plus {1 - w:g} times the false-positive reduction's.",
            "",
        ]
    return lines


def model_card(
    model_set: ModelSet, performance: str = "", limitations: str = "", threshold_note: str = ""
) -> str:
    """``MODEL_CARD.md`` of a model set, from its stages' manifests and ``pipeline.json``;
    ``threshold_note`` says how the report threshold was chosen."""
    lines = [
        f"# Model card: {model_set.name}" + (f" {model_set.version}" if model_set.version else ""),
        "",
        model_set.description or "A model set of the lung-nodule suite.",
        "",
        "## Intended use",
        "",
        "Research and teaching: detecting pulmonary-nodule candidates in chest CT to study and",
        "compare methods. **Not a medical device**: not for diagnosis, screening or any",
        "clinical decision.",
        "",
    ]
    if model_set.demo_grade:
        lines += [
            "**Demo-grade training.** " + (model_set.warning() or ""),
            "",
        ]
    lines += ["## Stages and training", ""]
    lines += [
        "| stage | plan | training data | folds | steps | wall time | hardware | converged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stage in model_set.stages:
        m = model_set.manifests[stage]
        prov = m.get("provenance") or {}
        hw = prov.get("hardware") or {}
        gpus = ", ".join(hw.get("gpus") or []) or "no GPU"
        folds = m.get("train_folds", m.get("training_folds", []))
        lines.append(
            f"| {stage_title(stage)} | {_plan_name(m)} | "
            f"{data_phrase(prov.get('data') or {})} | {folds} | {prov.get('steps')} | "
            f"{(prov.get('train_seconds') or 0) / 60:.0f} min | "
            f"{hw.get('cpu_count')} CPU cores ({hw.get('processor') or hw.get('machine')}), "
            f"{gpus} | {_convergence_cell(model_set.root / stage)} |"
        )
    versions = (model_set.manifests["unet"].get("provenance") or {}).get("versions") or {}
    lines += [
        "",
        *_ensemble_lines(model_set.stages),
        "Converged: whether the validation loss still fell in the last quarter of the epochs "
        "(by 2 % or more: no), from each stage's training log; a dash where the log is too "
        "short to say.",
        "",
        *_int8_lines(model_set.root / "unet"),
    ]
    lines += [
        "Packages: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".",
        "Each stage folder's `manifest.json` holds its seeds, series, steps and a sha256 per",
        "file; the suite checks them when it loads the set.",
        "",
        *_threshold_lines(model_set.root, threshold_note, model_set.stages),
        "## Measured performance",
        "",
        performance.strip() or "Not measured yet.",
        "",
        "## Known limitations",
        "",
        limitations.strip()
        or "- Trained on synthetic data; its numbers on real scans are not established.",
        "",
    ]
    return "\n".join(lines)
