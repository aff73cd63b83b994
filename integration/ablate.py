"""``python -m integration ablate``: named configurations of the detector, one table, one FROC.

A grid is a JSON file::

    {"description": "...",
     "base":    {"unet_preset": "2d", "gan": true, "fpr_variant": "mgi", ...},
     "configs": {"full": {}, "no_gan": {"gan": false}, "unet_alone": {"fpr": false}, ...}}

Every config is ``base`` with its own overrides; the keys are those of
:class:`integration.stages.StageSettings` (``unet_preset``, ``candidates``, ``gan``, ``fpr``, ``fpr_plan``,
``fpr_variant``, ``merge``, ``tta``, the minute budgets, plan overrides...). The grid
shipped with the package (``integration/data/default_grid.json``, used when ``--grid`` is not
given) covers: with / without CT-GAN augmentation; the MGI-CNN against its ablations (ri, lr,
zoom_in, zoom_out); sum / concat / conv1x1 merge of its streams; the MGI-CNN against two other
false-positive reducers on the same candidates (``"fpr_plan": "resnet3d"``, a 3-D ResNet, and
``"cnn3d"``, a small 3-D CNN: the ``default`` plan with only the network and its input
changed); the 2-D and the 3-D U-Net, and the CenterNet heatmap detector in their place
(``"candidates": "centernet"``); the U-Net alone (no false-positive reduction); with /
without test-time augmentation. A second shipped grid, ``quick`` (``--grid quick``), runs five
of them with short budgets. The third, ``rank``, runs the default grid's configs (and the 3-D
U-Net with the 2-D preset's hard-negative loss) with every training limited by its epochs
(steps for CT-GAN) instead of minutes, the minute budgets only caps: a run stopped and resumed
then trains exactly as much as one that was not, which a ranking over several sittings needs.

All configs use the same folds (default: train 0-6, validate 7, test 8-9, as the demo), and
trained stages are shared, each keyed by the settings that shape it:

* U-Net (or the CenterNet that ``candidates`` names): its plan (preset + overrides), budget
  and folds; its test candidates go with it, so "U-Net alone" costs nothing more;
* CT-GAN: its plan, budget, nodules per scan and training folds (the augmented scans and their
  cache overlay go with it);
* MGI-CNN (or the plan's other network): its plan (network, variant, merge...; only the
  fields its network reads), budget, folds and the CT-GAN key. TTA is not part of it: a config
  that differs only in ``tta`` rescores with the same model.

``OUT/stages/<key>/key.json`` says what made each shared stage. A config whose
``OUT/configs/<name>/result.json`` matches its settings, stages, folds and bootstrap is not run
again (resumable). Outputs: ``OUT/ablation.md`` and ``OUT/ablation.csv`` (CPM with its 95%
bootstrap interval, the difference to the first config with its paired interval and p-value,
the sensitivities at 1/8 .. 8 FPs per scan, and the stage-1 network's own sensitivity at 10 ..
100 candidates per scan), ``OUT/comparison/`` (the paired comparison,
:mod:`integration.compare`), ``OUT/ablation_froc.png`` (every config's FROC on one figure) and
``OUT/convergence.png`` (every trained stage's validation loss per epoch).
The first config of the grid is the reference the others are compared with.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from integration.stages import (
    Split,
    StageClock,
    StagePaths,
    StageRun,
    StageSettings,
    evaluate_submission,
    excluded_table,
    fold_uids,
    prepare_cache,
    read_json_or_empty,
    run_stages,
    write_series,
)
from lungct.errors import LungCTError
from lungct.fileio import read_json, write_json_atomic, write_text_atomic
from lungct.tables import write_csv_atomic

if TYPE_CHECKING:
    from integration.compare import Comparison

DEFAULT_SPLIT = Split(train=(0, 1, 2, 3, 4, 5, 6), val=(7,), test=(8, 9))
"""The folds every config uses unless told otherwise (the demo's)."""
GRID_KEYS = ("description", "base", "configs", "seeds")
SEED_KEYS = ("unet_overrides", "centernet_overrides", "gan_overrides", "fpr_overrides")
"""The plan overrides that take a training run's random seed."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def default_grid_path(name: str = "default") -> Path:
    """A grid shipped with the package: ``default`` (every ablation), ``quick`` (5 configs) or
    ``rank`` (every ablation, each training a fixed number of epochs)."""
    return Path(str(resources.files("integration") / "data" / f"{name}_grid.json"))


@dataclass
class AblationConfig:
    """One named configuration of a grid."""

    name: str
    settings: StageSettings
    overrides: dict[str, Any]


@dataclass
class Grid:
    """A parsed grid file."""

    configs: list[AblationConfig]
    description: str = ""
    source: str | None = None
    seeds: int = 1


def load_grid(path: str | os.PathLike | None = None) -> Grid:
    """Read and check a grid file: a path, or the name of a shipped grid (``default`` when
    ``None``; ``quick``, ``rank``).

    Raises:
        LungCTError: unreadable JSON, unknown keys, bad values, bad config names, no configs.
    """
    if path is None:
        path = default_grid_path()
    elif not Path(path).exists() and re.fullmatch(r"[a-z_]+", str(path)):
        path = default_grid_path(str(path))
    path = Path(path)
    data = read_json(path, "grid file not found")
    if not isinstance(data, dict):
        raise LungCTError(path, "a grid must be a JSON object")
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise LungCTError(path, f"unknown grid keys {unknown} (known: {', '.join(GRID_KEYS)})")
    base = data.get("base", {})
    configs = data.get("configs")
    if not isinstance(configs, dict) or not configs:
        raise LungCTError(path, "the grid needs a non-empty 'configs' object")
    if not isinstance(base, dict):
        raise LungCTError(path, "'base' must be a JSON object")
    StageSettings.from_dict(base, source=f"{path}: base")
    seeds = data.get("seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise LungCTError(path, f"'seeds' must be a whole number >= 1, got {seeds!r}")
    out = []
    for name, overrides in configs.items():
        if not _NAME.match(name):
            raise LungCTError(path, f"config name {name!r}: use letters, digits and _ . + -")
        if not isinstance(overrides, dict):
            raise LungCTError(path, f"config {name!r} must be a JSON object")
        settings = StageSettings.from_dict({**base, **overrides}, source=f"{path}: config {name}")
        out.append(AblationConfig(name, settings, overrides))
    return Grid(out, str(data.get("description", "")), str(path), seeds)


def seeded(config: AblationConfig, seed: int) -> AblationConfig:
    """``config`` trained with random seed ``seed`` (U-Net, CT-GAN and MGI-CNN plans alike).

    Seed 0 is the plans' own seed: the config itself. Another seed is a config of its own,
    ``<name>.seed<k>``, whose stages are keyed, shared and resumed like any other.
    """
    if seed == 0:
        return config
    values = config.settings.to_dict()
    for key in SEED_KEYS:
        values[key] = {**values[key], "seed": seed}
    overrides = {**config.overrides, **{k: values[k] for k in SEED_KEYS}}
    return AblationConfig(f"{config.name}.seed{seed}", StageSettings.from_dict(values), overrides)


# ----------------------------------------------------------------------------------------------
# Stage keys: which trained stages two configs share
# ----------------------------------------------------------------------------------------------


def _digest(content: dict[str, Any]) -> str:
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def stage_keys(settings: StageSettings, split: Split) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{"unet": (name, content), "gan": ..., "fpr": ...}`` for one config (``gan`` / ``fpr``
    absent when off). ``content`` is everything that shapes the stage; ``name`` is readable and
    ends with a hash of ``content``, so two configs share a stage exactly when they agree."""
    keys: dict[str, tuple[str, dict[str, Any]]] = {}
    unet = {  # the stage-1 network: a U-Net, or the CenterNet of ``candidates``
        "plan": settings.candidate_plan().to_dict(),
        "minutes": settings.candidate_minutes,
        "train": list(split.train),
        "val": list(split.val),
        "test": list(split.test),
    }
    unet_name = (
        f"unet-{settings.unet_preset}" if settings.candidates == "unet" else settings.candidates
    )
    keys["unet"] = (f"{unet_name}-{_digest(unet)}", unet)
    gan_name = None
    if settings.fpr and settings.gan:
        gan = {
            "plan": settings.gan_plan_resolved().to_dict(),
            "minutes": settings.gan_minutes,
            "per_scan": settings.gan_per_scan,
            "train": list(split.train),
        }
        gan_name = f"gan-{_digest(gan)}"
        keys["gan"] = (gan_name, gan)
    if settings.fpr:
        plan = settings.fpr_plan_resolved()
        fpr = {
            "plan": plan.key_fields(),
            "minutes": settings.fpr_minutes,
            "gan": gan_name,
            "train": list(split.train),
            "val": list(split.val),
            "test": list(split.test),
        }
        if settings.hard_negatives:  # they are the stage-1 network's candidates
            fpr["hard_negatives"] = keys["unet"][0]
        network = f"{plan.variant}-{plan.merge}" if plan.network == "mgicnn" else plan.network
        keys["fpr"] = (
            f"fpr-{network}-{'gan' if gan_name else 'nogan'}-{_digest(fpr)}",
            fpr,
        )
    return keys


def config_paths(out: Path, name: str, keys: dict[str, tuple[str, dict[str, Any]]]) -> StagePaths:
    """Where one config's (shared) stages live."""
    stages = out / "stages"
    unet = stages / keys["unet"][0]
    gan = stages / keys["gan"][0] if "gan" in keys else stages / "no-gan"
    fpr = stages / keys["fpr"][0] if "fpr" in keys else stages / "no-fpr"
    return StagePaths(
        unet=unet / "model",
        test_candidates=unet / "candidates_test.csv",
        gan=gan / "model",
        augmented=gan / "augmented",
        fpr_cache=gan / "cache" if "gan" in keys else None,
        train_candidates=fpr / "candidates_train.csv",
        fpr=fpr / "model",
        submission=out / "configs" / name / "submission.csv",
    )


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def _record(
    config: AblationConfig, split: Split, bootstrap: int
) -> tuple[dict[str, tuple[str, dict[str, Any]]], dict[str, Any]]:
    keys = stage_keys(config.settings, split)
    record = {
        "name": config.name,
        "settings": config.settings.to_dict(),
        "stages": {stage: name for stage, (name, _) in keys.items()},
        "split": split.to_dict(),
        "bootstrap": bootstrap,
    }
    return keys, record


def _finished(
    config: AblationConfig, out: Path, split: Split, bootstrap: int
) -> dict[str, Any] | None:
    """The config's ``result.json`` if it was evaluated with these very settings, else None."""
    _, record = _record(config, split, bootstrap)
    previous = read_json_or_empty(out / "configs" / config.name / "result.json")
    if previous and "metrics" in previous and all(previous.get(k) == v for k, v in record.items()):
        return previous
    return None


def run_config(
    config: AblationConfig,
    data: Path,
    cache: Path,
    out: Path,
    split: Split,
    bootstrap: int,
    workers: int = 2,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or resume, or skip) one config; return its ``result.json`` content."""
    from integration.evaluation import write_outputs
    from lungct.training import convergence

    keys, record = _record(config, split, bootstrap)
    config_dir = out / "configs" / config.name
    previous = _finished(config, out, split, bootstrap)
    if previous is not None:
        log(f"[ablate] {config.name}: already evaluated, skipped")
        return previous
    for name, content in keys.values():
        write_json_atomic(out / "stages" / name / "key.json", content)
    paths = config_paths(out, config.name, keys)
    # What this config wrote before was made with other settings (e.g. another tta): redo it.
    paths.submission.unlink(missing_ok=True)
    clock = StageClock(log=log, prefix=f"ablate {config.name}")
    run = StageRun(
        data=data,
        cache=cache,
        split=split,
        settings=config.settings,
        paths=paths,
        clock=clock,
        workers=workers,
        progress=progress,
    )
    outputs = run_stages(run)
    submission = paths.submission
    if not config.settings.fpr:  # the candidate stage alone: its probabilities are the scores
        write_text_atomic(submission, outputs.test_candidates.read_text())
    series = write_series(config_dir / "seriesuids.csv", fold_uids(data, split.test))
    result = clock.run(
        "evaluate",
        lambda: evaluate_submission(data, series, submission, bootstrap, label=config.name),
    )
    metrics = write_outputs(result, config_dir / "evaluation")
    record.update(metrics=metrics, seconds=clock.seconds, overrides=config.overrides)
    record["candidate_stage"] = candidate_stage(data, series, paths.test_candidates)
    record["convergence"] = {
        stage: convergence(folder)
        for stage, folder in (("unet", paths.unet), ("fpr", paths.fpr))
        if stage in keys
    }
    if "fpr" in keys:
        record["fpr_val_auc"] = final_val_auc(paths.fpr)
        plan = config.settings.fpr_plan_resolved()
        record["fpr_network"] = {
            "network": plan.network,
            **{k: getattr(plan, k) for k in ("variant", "merge", "conv")},
        }
    write_json_atomic(config_dir / "result.json", record)
    return record


def candidate_stage(data: Path, series: Path, candidates: Path) -> dict[str, Any] | None:
    """Stage 1 alone on the test scans: the sensitivity of its candidates against candidates
    per scan (:func:`integration.evaluation.candidate_sensitivity`: every candidate counts, by
    its probability; ``candidate_sensitivity_at`` holds 10 .. 1000 per scan), so that U-Nets
    and the CenterNet compare before any false-positive reduction. ``None`` without the file."""
    from integration.evaluation import candidate_sensitivity
    from lungct.tables import read_annotations, read_results, read_seriesuids

    if not candidates.is_file() or not series.is_file():
        return None
    found = candidate_sensitivity(
        read_annotations(data / "annotations.csv"),
        read_results(candidates),
        read_seriesuids(series),
    )
    return found.to_json()


def final_val_auc(model_dir: Path) -> float | None:
    """The validation AUC of a false-positive reducer's last epoch (the model it keeps), from
    its training log; ``None`` without one. A network that has not learned keeps a flat loss
    too, which the convergence rule alone would call converged; its AUC says it."""
    from lungct.training import log_float, read_log

    rows = read_log(model_dir)
    value = log_float(rows[-1], "val_auc") if rows else float("nan")
    return value if np.isfinite(value) else None


def _with_stage_figures(result: dict[str, Any], data: Path, out: Path) -> dict[str, Any]:
    """``result`` with its ``candidate_stage`` and ``fpr_val_auc`` (results of earlier
    versions lack them: measured from the shared stages where they are still in ``out``)."""
    result = dict(result)
    if result.get("candidate_stage") is None:
        result["candidate_stage"] = candidate_stage(
            data,
            out / "configs" / result["name"] / "seriesuids.csv",
            out / "stages" / result["stages"]["unet"] / "candidates_test.csv",
        )
    if result.get("fpr_val_auc") is None and "fpr" in result["stages"]:
        result["fpr_val_auc"] = final_val_auc(out / "stages" / result["stages"]["fpr"] / "model")
    return result


def run_ablation(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    grid: Grid | str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    split: Split = DEFAULT_SPLIT,
    bootstrap: int = 1000,
    only: Sequence[str] | None = None,
    workers: int = 2,
    progress: bool = True,
    log: Callable[[str], None] = print,
    seeds: int | None = None,
) -> list[dict[str, Any]]:
    """Run every config of a grid (or those named in ``only``) and write the table and figure.

    With ``seeds`` (default: the grid's ``seeds``, else 1) above 1, every config is also
    trained with random seeds 1 .. seeds-1 (:func:`seeded`), and the table gives the spread of
    its CPM, and of its difference to the reference, across those training runs.

    Returns:
        The configs' ``result.json`` contents (seed 0), in grid order; each carries
        ``seed_cpms``, the CPM of every seed.

    Raises:
        LungCTError: a missing data folder, a bad grid, an unknown name in ``only``, folds
            without scans, a stage's error.
    """
    data, out = Path(data_dir), Path(out_dir)
    if not data.is_dir():
        raise LungCTError(data, "dataset folder does not exist")
    if not isinstance(grid, Grid):
        grid = load_grid(grid)
    configs = grid.configs
    if only:
        names = [c.name for c in configs]
        missing = [n for n in only if n not in names]
        if missing:
            raise LungCTError(
                grid.source, f"no config named {missing[0]!r} (configs: {', '.join(names)})"
            )
        configs = [c for c in configs if c.name in set(only)]
    seeds = grid.seeds if seeds is None else seeds
    if seeds < 1:
        raise LungCTError(None, f"seeds must be >= 1, got {seeds}")
    cache = Path(cache_dir) if cache_dir is not None else out / "cache"
    fold_uids(data, split.train + split.val + split.test)  # folds without scans stop here
    previous = read_json_or_empty(out / "ablation_config.json")
    if previous and previous.get("data") != str(data.resolve()):
        # The shared stages are keyed by settings, not by data: never mix two datasets.
        raise LungCTError(
            out, f"holds an ablation of {previous.get('data')}; use another --out for this --data"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out / "ablation_config.json",
        {
            "grid": grid.source,
            "description": grid.description,
            "data": str(data.resolve()),
            "cache": str(cache.resolve()),
            "split": split.to_dict(),
            "bootstrap": bootstrap,
            "seeds": seeds,
            "configs": {c.name: c.settings.to_dict() for c in configs},
        },
    )
    runs = [seeded(c, k) for c in configs for k in range(seeds)]
    shared = _sharing(runs, split)
    log(
        f"[ablate] {len(configs)} configs"
        + (f" x {seeds} seeds" if seeds > 1 else "")
        + f" share {shared['unet']} U-Net, "
        + (f"{shared['centernet']} CenterNet, " if shared["centernet"] else "")
        + f"{shared['gan']} CT-GAN "
        f"and {shared['fpr']} MGI-CNN trainings; folds train "
        f"{','.join(map(str, split.train))} / val {','.join(map(str, split.val))} / test "
        f"{','.join(map(str, split.test))}"
    )
    prepare_cache(data, cache, workers=workers, progress=progress)
    done: dict[str, dict[str, Any]] = {}
    for i, config in enumerate(runs, start=1):
        log(f"[ablate] config {i}/{len(runs)}: {config.name}")
        done[config.name] = run_config(
            config, data, cache, out, split, bootstrap, workers, progress, log
        )
    # The table holds every config of the grid evaluated so far with the same settings.
    results = []
    for config in grid.configs:
        result = done.get(config.name) or _finished(config, out, split, bootstrap)
        if result is None:
            continue
        result = dict(_with_stage_figures(result, data, out), seed_cpms=[result["metrics"]["cpm"]])
        for k in range(1, seeds):
            other = seeded(config, k)
            extra = done.get(other.name) or _finished(other, out, split, bootstrap)
            if extra is not None:
                result["seed_cpms"].append(extra["metrics"]["cpm"])
        results.append(result)
    comparison = compare_configs(results, data, out, bootstrap, log)
    write_table(results, out, comparison)
    plot_ablation(results, out, out / "ablation_froc.png")
    plot_convergence(results, out, out / "convergence.png")
    return results


def compare_configs(
    results: Sequence[dict[str, Any]],
    data: Path,
    out: Path,
    bootstrap: int,
    log: Callable[[str], None] = print,
) -> Comparison | None:
    """Every config against the first (the grid's reference) by a paired bootstrap on the
    test scans (:func:`integration.compare.compare`); written to ``OUT/comparison/``.

    ``None`` with fewer than two configs, without a bootstrap, or when a config's submission
    is gone (said in the log).
    """
    from integration.compare import compare_files, write_comparison

    if len(results) < 2 or bootstrap < 1:
        return None
    submissions = [out / "configs" / r["name"] / "submission.csv" for r in results]
    missing = [p for p in submissions if not p.is_file()]
    if missing:
        log(f"[ablate] no paired comparison: {missing[0]} is missing (rerun that config)")
        return None
    comparison = compare_files(
        data / "annotations.csv",
        excluded_table(data),
        out / "configs" / results[0]["name"] / "seriesuids.csv",
        submissions,
        labels=[r["name"] for r in results],
        bootstrap=bootstrap,
        seed=0,
    )
    write_comparison(comparison, out / "comparison")
    return comparison


def _sharing(configs: Sequence[AblationConfig], split: Split) -> dict[str, int]:
    distinct: dict[str, set[str]] = {"unet": set(), "centernet": set(), "gan": set(), "fpr": set()}
    for c in configs:
        for stage, (name, _) in stage_keys(c.settings, split).items():
            if stage == "unet" and c.settings.candidates != "unet":
                stage = "centernet"
            distinct[stage].add(name)
    return {k: len(v) for k, v in distinct.items()}


# ----------------------------------------------------------------------------------------------
# Table and figure
# ----------------------------------------------------------------------------------------------

RATE_LABELS = ("1/8", "1/4", "1/2", "1", "2", "4", "8")
TABLE_BUDGETS = (10, 25, 50, 100)
"""Candidates per scan at which ``ablation.csv`` gives stage 1's own sensitivity."""


def _unet_preset(settings: dict[str, Any]) -> str:
    """The U-Net preset of a result's settings (``unet_variant`` in results of earlier versions)."""
    return settings.get("unet_preset") or settings.get("unet_variant") or ""


def _candidates(settings: dict[str, Any]) -> str:
    """The stage-1 network of a result's settings: the U-Net preset, or the CenterNet plan."""
    found = settings.get("candidates") or "unet"
    return _unet_preset(settings) if found == "unet" else found


def _network(result: dict[str, Any]) -> dict[str, str]:
    """The false-positive reducer's resolved network, and the MGI-CNN's variant / merge /
    conv (empty for the other networks; results of earlier versions are MGI-CNNs)."""
    settings = result["settings"]
    found = result.get("fpr_network") or {}
    network = found.get("network") or "mgicnn"
    if network != "mgicnn":
        return {"network": network, "variant": "", "merge": "", "conv": found.get("conv", "")}
    return {
        "network": network,
        "variant": found.get("variant") or settings["fpr_variant"] or "",
        "merge": found.get("merge") or settings.get("merge") or "",
        "conv": found.get("conv", ""),
    }


def _describe(result: dict[str, Any]) -> dict[str, str]:
    settings = result["settings"]
    if settings["fpr"]:
        net = _network(result)
        if net["network"] == "mgicnn":
            fpr = f"{net['variant']}/{net['merge']}"
            if net["conv"] and net["conv"] != "2.5d":
                fpr += f" {net['conv']}"
        else:
            fpr = net["network"]
        if settings["fpr_plan"] not in ("default", net["network"]):
            fpr += f" ({settings['fpr_plan']})"
        tta = "yes" if settings["tta"] else "no"
        gan = "yes" if settings["gan"] else "no"
    else:
        scorer = "U-Net" if (settings.get("candidates") or "unet") == "unet" else "CenterNet"
        fpr, tta, gan = f"none ({scorer} scores)", "-", "-"
    return {"unet": _candidates(settings), "gan": gan, "fpr": fpr, "tta": tta}


def write_table(
    results: Sequence[dict[str, Any]], out: Path, comparison: Comparison | None = None
) -> tuple[Path, Path]:
    """``ablation.csv`` and ``ablation.md``: CPM [95% CI], and with a ``comparison`` the
    difference to the first config with its paired interval and p-value, then the seven
    sensitivities and stage 1's own sensitivity at 10 .. 100 candidates per scan (the table:
    at 50)."""
    from integration.evaluation import FP_RATE_KEYS

    paired = {d.label: d for d in comparison.differences} if comparison is not None else {}
    reference = results[0]["name"] if results else ""
    seeded_runs = any(len(r.get("seed_cpms", ())) > 1 for r in results)
    ref_seeds = results[0].get("seed_cpms", []) if results else []
    header = (
        "config", "cpm", "cpm_ci95_lower", "cpm_ci95_upper",
        "cpm_diff", "cpm_diff_ci95_lower", "cpm_diff_ci95_upper", "cpm_diff_p",
        "seeds", "cpm_seed_min", "cpm_seed_max", "cpm_diff_seed_min", "cpm_diff_seed_max",
        *(f"sens_{k}" for k in FP_RATE_KEYS),
        *(f"candidate_sens_{b}" for b in TABLE_BUDGETS), "candidates_per_scan",
        "nodules", "detected", "scans", "unet_preset", "gan", "fpr", "fpr_plan", "fpr_variant",
        "merge", "tta", "unet_stage", "gan_stage", "fpr_stage", "fpr_network", "candidates",
        "fpr_val_auc",
    )  # fmt: skip
    rows = []
    seed_head = " CPM over seeds | - reference over seeds |" if seeded_runs else ""
    lines = [
        f"| config | CPM [95% CI] | - {reference} [paired 95% CI] | p |{seed_head} "
        + " | ".join(RATE_LABELS)
        + " | candidates | found at 50 per scan | CT-GAN | FP reduction | its val AUC | TTA"
        " | converged |",
        "|---|---|---|---|"
        + "---|" * (2 if seeded_runs else 0)
        + "---|" * len(RATE_LABELS)
        + "---|---|---|---|---|---|---|",
    ]
    for r in results:
        m, s, stages = r["metrics"], r["settings"], r["stages"]
        ci = m.get("cpm_ci95") or [None, None]
        sens = [m["sensitivity"][k] for k in FP_RATE_KEYS]
        net = _network(r) if s["fpr"] else {"network": "", "variant": "", "merge": ""}
        d = paired.get(r["name"])
        diff = ["", "", "", ""] if d is None else [d.cpm_difference, *d.ci, d.p_value]
        seed_cpms = r.get("seed_cpms") or [m["cpm"]]
        # Differences to the reference trained with the same seed, for the seeds both have.
        seed_diffs = [a - b for a, b in zip(seed_cpms, ref_seeds, strict=False)]
        spread = [len(seed_cpms), min(seed_cpms), max(seed_cpms)]
        spread += [min(seed_diffs), max(seed_diffs)] if seed_diffs else ["", ""]
        stage1 = r.get("candidate_stage") or {}
        at = stage1.get("candidate_sensitivity_at") or {}
        stage1_row = [at.get(str(b), "") for b in TABLE_BUDGETS]
        stage1_row.append(stage1.get("candidates_per_scan", ""))
        rows.append(
            [
                r["name"], m["cpm"], ci[0] if ci[0] is not None else "",
                ci[1] if ci[1] is not None else "", *diff, *spread, *sens, *stage1_row,
                m["nodules"],
                m["detected"],
                m["scans"], _unet_preset(s), s["gan"], s["fpr"], s["fpr_plan"],
                net["variant"], net["merge"], s["tta"], stages.get("unet", ""),
                stages.get("gan", ""), stages.get("fpr", ""), net["network"], _candidates(s),
                "" if r.get("fpr_val_auc") is None else r["fpr_val_auc"],
            ]
        )  # fmt: skip
        cpm = f"{m['cpm']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else "")
        if d is not None:
            mark = " *" if d.excludes_zero else ""
            versus = f"{d.cpm_difference:+.3f} [{d.ci[0]:+.3f}, {d.ci[1]:+.3f}]{mark}"
            p_text = f"{d.p_value:.3f}"
        else:
            versus, p_text = ("reference" if r["name"] == reference else "-"), ""
        described = _describe(r)
        seed_text = ""
        if seeded_runs:
            seed_text = f" {min(seed_cpms):.3f} .. {max(seed_cpms):.3f} ({len(seed_cpms)}) |"
            if r["name"] == reference or not seed_diffs:
                seed_text += " - |"
            else:
                seed_text += f" {min(seed_diffs):+.3f} .. {max(seed_diffs):+.3f} |"
        lines.append(
            f"| {r['name']} | {cpm} | {versus} | {p_text} |{seed_text} "
            + " | ".join(f"{v:.3f}" for v in sens)
            + f" | {described['unet']} | {_found_at(at, 50)} | {described['gan']}"
            f" | {described['fpr']} | {_auc_text(r)}"
            f" | {described['tta']} | {_converged(r)} |"
        )
    csv_path, md_path = out / "ablation.csv", out / "ablation.md"
    write_csv_atomic(csv_path, header, rows)
    first = results[0]
    intro = (
        f"Ablation: CPM and sensitivity at 1/8 .. 8 false positives per scan on test folds "
        f"{','.join(map(str, first['split']['test']))} (trained on "
        f"{','.join(map(str, first['split']['train']))}, validated on "
        f"{','.join(map(str, first['split']['val']))}); 95% bootstrap interval over scans "
        f"({first['bootstrap']} resamples). Found at 50 per scan: the share of the test "
        "nodules that the stage-1 network's candidates hit when it keeps about 50 per scan "
        "(its own probabilities, before false-positive reduction).\n\n"
    )
    if comparison is not None:
        intro += (
            f"Each config against {reference}: the CPM difference with its paired interval "
            "(both scored on the same resampled scans) and its two-sided bootstrap p-value; "
            "* marks an interval that excludes 0 (a difference at this level). Converged: "
            "whether each trained stage's validation loss (candidates / FP reducer) still fell "
            "by 2 % or more in the last quarter of its epochs (no) or not (yes; ? where the "
            "log is too short to say); a network that has not learned has a flat loss too, "
            "so its val AUC (the FP reducer's last epoch on the validation folds) is given "
            "beside it. The interval "
            "is over test scans, not over training runs"
            + (
                "; the seed columns give the range of the CPM, and of the difference to "
                f"{reference} trained with the same seed, over the training runs (seed 0 is the "
                "row's own run).\n\n"
                if seeded_runs
                else ": each config was trained once.\n\n"
            )
        )
    write_text_atomic(md_path, intro + "\n".join(lines) + "\n")
    return csv_path, md_path


def _auc_text(result: dict[str, Any]) -> str:
    """The false-positive reducer's last validation AUC, as the table shows it."""
    value = result.get("fpr_val_auc")
    return "-" if value is None else f"{value:.3f}"


def _found_at(at: dict[str, float], budget: int) -> str:
    """The candidates' sensitivity at ``budget`` per scan, as the table shows it."""
    value = at.get(str(budget))
    return "-" if value is None else f"{value:.3f}"


def _converged(result: dict[str, Any]) -> str:
    """``yes`` / ``no`` / ``?`` for each trained stage of a config (candidates, then FP
    reducer): whether its validation loss had stopped falling (:func:`lungct.training.convergence`)."""
    found = result.get("convergence") or {}
    words = []
    for stage in ("unet", "fpr"):
        if stage in found:
            c = found[stage]
            words.append("?" if c is None else ("yes" if c["plateau"] else "no"))
    return " / ".join(words) or "-"


def _read_curve_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        names = reader.fieldnames or []
    return {name: np.asarray([r[name] for r in rows], dtype=np.float64) for name in names}


def load_curve(result: dict[str, Any], out: Path) -> Any:
    """The FROC (and bootstrap band) of one evaluated config, from its evaluation folder."""
    from integration.evaluation import FrocCurve

    folder = out / "configs" / result["name"] / "evaluation"
    froc = _read_curve_csv(folder / "froc.csv")
    curve = FrocCurve(
        fps=froc["fps_per_scan"],
        sens=froc["sensitivity"],
        label=result["name"],
        cpm=result["metrics"]["cpm"],
    )
    ci = result["metrics"].get("cpm_ci95")
    band = folder / "froc_bootstrap.csv"
    if ci and band.is_file():
        b = _read_curve_csv(band)
        curve.band_fps, curve.band_mean = b["fps_per_scan"], b["sensitivity_mean"]
        curve.band_lower, curve.band_upper = b["sensitivity_lower"], b["sensitivity_upper"]
        curve.cpm_ci = (ci[0], ci[1])
    return curve


def plot_ablation(results: Sequence[dict[str, Any]], out: Path, path: Path) -> Path:
    """One figure with every config's FROC (bands only when there are at most three)."""
    from integration.evaluation import plot_froc

    curves = [load_curve(r, out) for r in results]
    if len(curves) > 3:  # a dozen overlapping bands hide the curves
        for c in curves:
            c.band_fps = c.band_lower = c.band_upper = c.band_mean = None
    plot_froc(curves, path, title="FROC - ablation")
    return path


CONVERGENCE_PANELS = (("unet", "stage 1 (U-Net / CenterNet)"), ("fpr", "false-positive reducer"))


def plot_convergence(results: Sequence[dict[str, Any]], out: Path, path: Path) -> Path:
    """Every trained stage's validation loss per epoch, relative to its best, one panel for
    stage 1 and one for the false-positive reducers, each line named by the configs sharing
    that training; the last quarter of a line (what the table's ``converged`` judges) drawn
    thick. Read from ``OUT/stages/<key>/model/logs/train_log.csv``; a stage without a log is
    left out (said in the panel when none has one)."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    from lungct.fileio import new_figure, write_figure_atomic
    from lungct.training import log_float, read_log

    fig = new_figure((11, 4.2))
    axes = fig.subplots(1, len(CONVERGENCE_PANELS))
    for ax, (stage, title) in zip(axes, CONVERGENCE_PANELS, strict=True):
        users: dict[str, list[str]] = {}
        for r in results:
            key = r["stages"].get(stage)
            if key:
                users.setdefault(key, []).append(r["name"])
        drawn = 0
        for key, names in users.items():
            rows = read_log(out / "stages" / key / "model")
            values = np.asarray([log_float(row, "val_loss") for row in rows], dtype=np.float64)
            epochs = np.arange(1, len(values) + 1)
            ok = np.isfinite(values)
            if ok.sum() < 2:
                continue
            best = values[ok].min()
            relative = values / best if best > 0 else values - best + 1.0
            label = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
            line = ax.plot(epochs[ok], relative[ok], lw=1, label=label)[0]
            tail = max(1, int(np.ceil(len(values) * 0.25)))
            last = ok & (epochs > len(values) - tail)
            ax.plot(epochs[last], relative[last], lw=2.5, color=line.get_color())
            drawn += 1
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation loss / its best")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if drawn:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter())
            ax.legend(fontsize=7, loc="upper right")
        else:
            ax.text(0.5, 0.5, "no training log", ha="center", va="center", transform=ax.transAxes)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Convergence: validation loss per epoch (thick: the last quarter)")
    fig.tight_layout()
    write_figure_atomic(fig, path, dpi=120)
    return path
