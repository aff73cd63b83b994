"""Augmenting a detector's training folds with injected nodules, in the LUNA16 layout.

``augment_dataset`` writes::

    OUT/subsetN/<seriesuid>.ctgan<k>.mhd (+ .zraw)   copy k of a training scan, nodules injected
    OUT/annotations.csv            seriesuid,coordX,coordY,coordZ,diameter_mm: the source scan's
                                   own nodules (same place) AND the injected ones, per new scan
    OUT/annotations_excluded.csv   the source scan's excluded findings, per new scan
    OUT/candidates.csv             the source scan's candidates + the injected nodules (class 1),
                                   when DATA/candidates.csv exists
    OUT/injected.csv               only the injected nodules, with source series, requested site,
                                   volume and juxtapleural flag
    OUT/seriesuids.csv             the new series, one a line
    OUT/augment_manifest.json      model, folds, settings and counts
    OUT/patches/...                (``write_patches``) the 1 mm cube around each injected nodule
    OUT/parts/<new uid>.json       per-scan record; a rerun skips scans that have one

so another stage trains on it by pointing ``--data`` at OUT (``link_originals`` also links the
source scans and their rows in, so OUT alone is a complete training set), or by merging.

The fold guard: every fold asked for must be one of the model's training folds
(``manifest.json``), and so must the fold of every scan; anything else is refused before any
scan is read, because a nodule injected by a model that saw the test folds leaks into them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ct_gan_augment.config import GANPlan
from ct_gan_augment.inject import CubeTamperer
from ct_gan_augment.manifest import ModelManifest, format_folds
from ct_gan_augment.paste import cut_cube, to_int16_hu
from ct_gan_augment.sites import choose_sites
from lungct.cache import ScanCache, find_scans
from lungct.errors import LungCTError
from lungct.fileio import save_npy_atomic, write_json_atomic, write_text_atomic
from lungct.io import read_scan, write_scan
from lungct.lungmask import segment_lungs
from lungct.tables import (
    ANNOTATION_COLUMNS,
    AnnotationTable,
    read_annotations,
    read_candidates,
    write_csv_atomic,
)

PARTS = "parts"


def augmented_uid(seriesuid: str, copy: int) -> str:
    """Series UID of copy ``copy`` of a scan: ``<uid>.ctgan<copy>``."""
    return f"{seriesuid}.ctgan{copy}"


def _rows(table: AnnotationTable | None, uid: str) -> list[list[float]]:
    if table is None:
        return []
    rows = table.rows_in_series(uid)
    return [[*table.coords[i].tolist(), float(table.diameter_mm[i])] for i in rows]


def _lung_source(cache: ScanCache | None, scan) -> tuple[np.ndarray, np.ndarray, Any]:
    """HU, lung mask and geometry to choose sites on: the cache entry if any, else the scan."""
    if cache is not None and cache.is_complete(scan.seriesuid):
        entry = cache.open(scan.seriesuid)
        return entry.volume, entry.lung, entry.geometry
    return scan.array, segment_lungs(scan), scan.geometry


def augment_dataset(
    data_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    folds: Iterable[int],
    per_scan: int,
    cache_dir: str | os.PathLike | None = None,
    copies: int = 1,
    juxtapleural_fraction: float = 0.0,
    seed: int = 0,
    write_patches: bool = False,
    link_originals: bool = False,
    progress: bool = True,
    allow_unfinished: bool = False,
) -> dict[str, Any]:
    """Write augmented copies of the training-fold scans (see the module docstring).

    Args:
        data_dir: LUNA16-layout dataset (``subsetN/*.mhd``, ``annotations.csv``...).
        model_dir: a trained injector folder.
        out_dir: output folder (created; a rerun resumes).
        folds: folds to augment; all must be training folds of the model.
        per_scan: nodules injected into each copy.
        cache_dir: per-scan cache (lung masks); scans without an entry are segmented here.
        copies: augmented copies of each scan.
        juxtapleural_fraction: chance that a site is placed against the pleura.
        seed: seeds site choice and noise.
        write_patches: also save the 1 mm cube around each injected nodule (``.npy``).
        link_originals: hard-link (or copy) the source scans and their rows into OUT.
        progress: show a progress bar.
        allow_unfinished: use an injector whose training has not ended.

    Returns:
        counts: ``{"scans", "new_scans", "injected", "empty", "skipped", "out"}``.

    Raises:
        LungCTError: the fold guard, a model that is not an injector, unreadable inputs.
    """
    data_dir, model_dir, out_dir = Path(data_dir), Path(model_dir), Path(out_dir)
    folds = sorted(set(int(f) for f in folds))
    if per_scan < 1 or copies < 1:
        raise LungCTError(None, "--per-scan and --copies must be >= 1")
    if not 0.0 <= juxtapleural_fraction <= 1.0:
        raise LungCTError(None, "the juxtapleural fraction must be in [0, 1]")
    manifest = ModelManifest.load(model_dir)
    if manifest.kind != "injector":
        raise LungCTError(model_dir, f"augmentation needs an injector, this is a {manifest.kind}")
    manifest.check_folds(folds)
    scans = find_scans(data_dir, folds)
    for s in scans:
        manifest.check_scan(s.seriesuid, s.fold)
    if out_dir.resolve() == data_dir.resolve():
        raise LungCTError(out_dir, "the output folder must not be the dataset folder")

    nodules = read_annotations(data_dir / "annotations.csv")
    excluded_path = data_dir / "annotations_excluded.csv"
    excluded = (
        read_annotations(excluded_path, allow_negative_diameter=True)
        if excluded_path.is_file()
        else None
    )
    candidates_path = data_dir / "candidates.csv"
    candidates = read_candidates(candidates_path) if candidates_path.is_file() else None
    cache = ScanCache(cache_dir) if cache_dir is not None else None
    tamperer = CubeTamperer.from_dir(model_dir, seed=seed, allow_unfinished=allow_unfinished)
    plan: GANPlan = tamperer.plan
    rng = np.random.default_rng(seed)
    parts = out_dir / PARTS
    parts.mkdir(parents=True, exist_ok=True)

    report = {"scans": len(scans), "new_scans": 0, "injected": 0, "empty": 0, "skipped": 0}
    bar = tqdm(total=len(scans) * copies, desc="augment", unit="scan", disable=not progress)
    for s in scans:
        todo = [
            k
            for k in range(copies)
            if not (parts / f"{augmented_uid(s.seriesuid, k)}.json").is_file()
        ]
        report["skipped"] += copies - len(todo)
        bar.update(copies - len(todo))
        if not todo:
            continue
        scan = read_scan(s.path)
        hu, lung, geometry = _lung_source(cache, scan)
        avoid = np.asarray(_rows(nodules, s.seriesuid) + _rows(excluded, s.seriesuid)).reshape(
            -1, 4
        )
        for k in todo:
            new_uid = augmented_uid(s.seriesuid, k)
            copy_rng = np.random.default_rng((seed, s.fold, k, int(rng.integers(1 << 31))))
            n_jp = int(copy_rng.binomial(per_scan, juxtapleural_fraction))
            sites = [
                (p, True)
                for p in choose_sites(hu, lung, geometry, n_jp, plan, copy_rng, avoid, True)
            ]
            taken = np.asarray([p for p, _ in sites]).reshape(-1, 3)
            avoid_more = np.concatenate([avoid, np.column_stack([taken, np.zeros(len(taken))])])
            sites += [
                (p, False)
                for p in choose_sites(
                    hu, lung, geometry, per_scan - len(sites), plan, copy_rng, avoid_more
                )
            ]
            tampered = scan
            injected = []
            for site, juxta in sites:
                tampered, nodule = tamperer.inject(tampered, site)
                if nodule.diameter_mm <= 0:
                    report["empty"] += 1
                    continue
                injected.append((nodule, juxta))
            tampered = dataclasses.replace(tampered, seriesuid=new_uid)
            write_scan(tampered, out_dir / f"subset{s.fold}" / f"{new_uid}.mhd")
            patch_files = []
            if write_patches:
                for j, (nodule, _) in enumerate(injected):
                    cube = cut_cube(
                        tampered.array, tampered.geometry, nodule.center, plan.cube_size
                    )
                    name = f"{new_uid}_{j}.npy"
                    save_npy_atomic(out_dir / "patches" / name, to_int16_hu(cube))
                    patch_files.append(name)
            part = {
                "seriesuid": new_uid,
                "source": s.seriesuid,
                "fold": s.fold,
                "injected": [
                    {
                        "center": list(n.center),
                        "diameter_mm": n.diameter_mm,
                        "site": list(n.site),
                        "volume_mm3": round(n.volume_mm3, 1),
                        "juxtapleural": juxta,
                        **({"patch": patch_files[j]} if write_patches else {}),
                    }
                    for j, (n, juxta) in enumerate(injected)
                ],
            }
            write_json_atomic(parts / f"{new_uid}.json", part)
            report["new_scans"] += 1
            report["injected"] += len(injected)
            bar.update()
        if link_originals:
            _link_scan(s.path, out_dir / f"subset{s.fold}")
    bar.close()
    _write_tables(out_dir, scans, nodules, excluded, candidates, link_originals)
    info = {
        "model_dir": str(model_dir),
        "model_kind": manifest.kind,
        "model_training_folds": format_folds(manifest.training_folds),
        "data_dir": str(data_dir),
        "cache_dir": None if cache_dir is None else str(cache_dir),
        "folds": format_folds(folds),
        "per_scan": per_scan,
        "copies": copies,
        "juxtapleural_fraction": juxtapleural_fraction,
        "seed": seed,
        "link_originals": link_originals,
        **report,
    }
    write_json_atomic(out_dir / "augment_manifest.json", info)
    return {**report, "out": str(out_dir)}


def _link_scan(mhd: Path, folder: Path) -> None:
    """Hard-link (copy where links fail) a scan's header and data file into ``folder``."""
    import shutil

    from lungct.io import parse_metaimage_header

    folder.mkdir(parents=True, exist_ok=True)
    data_file = parse_metaimage_header(mhd).get("ElementDataFile", "")
    files = [mhd] + ([mhd.parent / data_file] if data_file and data_file != "LOCAL" else [])
    for f in files:
        target = folder / f.name
        if target.exists():
            continue
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)


def _write_tables(
    out_dir: Path,
    scans: list,
    nodules: AnnotationTable,
    excluded: AnnotationTable | None,
    candidates,
    link_originals: bool,
) -> None:
    """Gather every part of OUT into the LUNA16 tables (sorted, so reruns give the same files)."""
    parts = sorted((out_dir / PARTS).glob("*.json"))
    records = [json.loads(p.read_text()) for p in parts]
    ann_rows, exc_rows, inj_rows, cand_rows, uids = [], [], [], [], []
    if link_originals:
        for s in scans:
            uids.append(s.seriesuid)
            ann_rows += [[s.seriesuid, *r] for r in _rows(nodules, s.seriesuid)]
            exc_rows += [[s.seriesuid, *r] for r in _rows(excluded, s.seriesuid)]
            cand_rows += _candidate_rows(candidates, s.seriesuid, s.seriesuid)
    for rec in records:
        uid, source = rec["seriesuid"], rec["source"]
        uids.append(uid)
        ann_rows += [[uid, *r] for r in _rows(nodules, source)]
        exc_rows += [[uid, *r] for r in _rows(excluded, source)]
        cand_rows += _candidate_rows(candidates, source, uid)
        for n in rec["injected"]:
            ann_rows.append([uid, *n["center"], n["diameter_mm"]])
            cand_rows.append([uid, *n["center"], 1])
            inj_rows.append(
                [uid, *n["center"], n["diameter_mm"], source, *n["site"], n["volume_mm3"],
                 int(n["juxtapleural"])]
            )  # fmt: skip
    write_csv_atomic(out_dir / "annotations.csv", ANNOTATION_COLUMNS, ann_rows)
    write_csv_atomic(out_dir / "annotations_excluded.csv", ANNOTATION_COLUMNS, exc_rows)
    write_csv_atomic(
        out_dir / "injected.csv",
        (*ANNOTATION_COLUMNS, "source_seriesuid", "siteX", "siteY", "siteZ", "volume_mm3",
         "juxtapleural"),
        inj_rows,
    )  # fmt: skip
    if candidates is not None:
        write_csv_atomic(
            out_dir / "candidates.csv",
            ("seriesuid", "coordX", "coordY", "coordZ", "class"),
            cand_rows,
        )
    write_text_atomic(out_dir / "seriesuids.csv", "".join(f"{u}\n" for u in uids))


def _candidate_rows(candidates, source: str, uid: str) -> list[list[Any]]:
    if candidates is None:
        return []
    rows = candidates.rows_in_series(source)
    labels = candidates.label if candidates.label is not None else np.zeros(len(candidates), int)
    return [[uid, *candidates.coords[i].tolist(), int(labels[i])] for i in rows]
