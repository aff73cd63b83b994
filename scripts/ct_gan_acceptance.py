"""CT-GAN acceptance run on a synthetic mini-LUNA: train, augment, realism AUC, U-Net recall, figure.

Run it under the shared lock (it trains for up to ~15 minutes)::

    flock /tmp/heavy_cpu.lock nice -n 10 .venv/bin/python scripts/ct_gan_acceptance.py \\
        --data /tmp/gan/data --cache /tmp/gan/cache --work /tmp/gan/run \\
        [--unet-model UNET_DIR] [--figure docs/ct_gan_grid.png]

Steps (each skipped when its output exists, so a rerun continues):

1. train the injector and the remover on the training folds (time-limited);
2. ``augment`` the training folds (these injected cubes train the realism classifiers);
3. inject into the held-out folds' scans (evaluation only - they never train anything);
4. realism: AUC of a logistic regression on cube features and of a small 3-D CNN, trained on
   training-fold cubes (real vs injected), scored on held-out cubes;
5. removal: HU at the centre of held-out real nodules before and after the remover;
6. if ``--unet-model`` is given: run ``python -m unet_candidates extract`` on the held-out
   injected scans and count the injected (and the real) nodules it finds (LUNA16 hit rule);
7. the figure: condition | generated | real cubes, injection before/after, removal before/after.

Results go to ``WORK/acceptance.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from ct_gan_augment.augment import augment_dataset
from ct_gan_augment.config import get_plan, parse_plan_overrides
from ct_gan_augment.inject import CubeTamperer
from ct_gan_augment.manifest import ModelManifest
from ct_gan_augment.paste import cut_cube
from ct_gan_augment.realism import realism_auc
from ct_gan_augment.sites import choose_sites
from ct_gan_augment.train import train_gan
from lungct.cache import ScanCache, find_scans
from lungct.fileio import write_json_atomic
from lungct.io import read_scan, write_scan
from lungct.tables import ANNOTATION_COLUMNS, parse_folds, read_annotations, write_csv_atomic


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_if_needed(args, kind: str, minutes: float, overrides: list[str]) -> Path:
    out = Path(args.work) / kind
    if (out / "manifest.json").is_file():
        log(f"{kind}: exists, not retrained ({out})")
        return out
    plan = get_plan(args.plan, **parse_plan_overrides(overrides))
    log(f"{kind}: training for at most {minutes:g} min (plan {plan.name}, gf={plan.gf})")
    t0 = time.perf_counter()
    summary = train_gan(
        args.data, args.cache, parse_folds(args.train_folds), kind, out, plan=plan,
        max_minutes=minutes, progress=not args.quiet,
    )  # fmt: skip
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(out / "train_summary.json", summary)
    log(f"{kind}: {json.dumps(summary)}")
    return out


def inject_held_out(args, injector: Path, out: Path) -> list[dict]:
    """Inject ``per_scan`` nodules into every held-out scan (evaluation only)."""
    rows_path = out / "injected.json"
    if rows_path.is_file():
        return json.loads(rows_path.read_text())
    tamperer = CubeTamperer.from_dir(injector, seed=args.seed + 1)
    cache = ScanCache(args.cache)
    nodules = read_annotations(Path(args.data) / "annotations.csv")
    excluded = read_annotations(
        Path(args.data) / "annotations_excluded.csv", allow_negative_diameter=True
    )
    rng = np.random.default_rng(args.seed + 1)
    rows, ann_rows = [], []
    for s in find_scans(args.data, parse_folds(args.test_folds)):
        scan = read_scan(s.path)
        entry = cache.open(s.seriesuid)
        avoid = []
        for table in (nodules, excluded):
            r = table.rows_in_series(s.seriesuid)
            avoid += np.column_stack([table.coords[r], table.diameter_mm[r]]).tolist()
        avoid = np.asarray(avoid).reshape(-1, 4)
        n_jp = int(rng.binomial(args.per_scan, args.juxtapleural_fraction))
        sites = [
            (p, True)
            for p in choose_sites(
                entry.volume, entry.lung, entry.geometry, n_jp, tamperer.plan, rng, avoid, True
            )
        ]
        more = np.concatenate(
            [
                avoid,
                np.column_stack(
                    [np.asarray([p for p, _ in sites]).reshape(-1, 3), np.zeros(len(sites))]
                ),
            ]
        )
        sites += [(p, False) for p in choose_sites(
            entry.volume, entry.lung, entry.geometry, args.per_scan - len(sites), tamperer.plan,
            rng, more)]  # fmt: skip
        new_uid = f"{s.seriesuid}.ctgan0"
        for site, juxta in sites:
            scan, nodule = tamperer.inject(scan, site)
            if nodule.diameter_mm > 0:
                rows.append({"seriesuid": new_uid, "source": s.seriesuid, "fold": s.fold,
                             "center": list(nodule.center), "diameter_mm": nodule.diameter_mm,
                             "juxtapleural": juxta})  # fmt: skip
                ann_rows.append([new_uid, *nodule.center, nodule.diameter_mm])
        r = nodules.rows_in_series(s.seriesuid)
        ann_rows += [[new_uid, *nodules.coords[i], nodules.diameter_mm[i]] for i in r]
        scan.seriesuid = new_uid
        write_scan(scan, out / f"subset{s.fold}" / f"{new_uid}.mhd")
    write_csv_atomic(out / "annotations.csv", ANNOTATION_COLUMNS, ann_rows)
    write_json_atomic(rows_path, rows)
    return rows


def real_cubes(args, folds: list[int], plan) -> tuple[np.ndarray, list[dict]]:
    nodules = read_annotations(Path(args.data) / "annotations.csv")
    cubes, info = [], []
    for s in find_scans(args.data, folds):
        rows = nodules.rows_in_series(s.seriesuid)
        keep = [
            i
            for i in rows
            if plan.min_nodule_diameter_mm <= nodules.diameter_mm[i] <= plan.max_diameter_mm
        ]
        if not keep:
            continue
        scan = read_scan(s.path)
        for i in keep:
            cubes.append(cut_cube(scan.array, scan.geometry, nodules.coords[i], plan.cube_size))
            info.append({"seriesuid": s.seriesuid, "path": str(s.path), "center": nodules.coords[i].tolist(),
                         "diameter_mm": float(nodules.diameter_mm[i])})  # fmt: skip
    return np.asarray(cubes, dtype=np.float32), info


def fake_cubes(folder: Path, rows: list[dict], plan) -> np.ndarray:
    cubes, by_uid = [], {}
    for r in rows:
        by_uid.setdefault((r["seriesuid"], r["fold"]), []).append(r)
    for (uid, fold), items in sorted(by_uid.items()):
        scan = read_scan(folder / f"subset{fold}" / f"{uid}.mhd")
        for r in items:
            cubes.append(cut_cube(scan.array, scan.geometry, r["center"], plan.cube_size))
    return np.asarray(cubes, dtype=np.float32)


def augmented_rows(aug_dir: Path) -> list[dict]:
    rows = []
    with (aug_dir / "injected.csv").open() as f:
        for r in csv.DictReader(f):
            rows.append({"seriesuid": r["seriesuid"], "center": [float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])],
                         "diameter_mm": float(r["diameter_mm"]), "fold": None, "source": r["source_seriesuid"]})  # fmt: skip
    folds = {}
    for sub in aug_dir.glob("subset*"):
        for p in sub.glob("*.mhd"):
            folds[p.stem] = int(sub.name[6:])
    for r in rows:
        r["fold"] = folds[r["seriesuid"]]
    return rows


def unet_recall(
    args, folder: Path, folds: str, truth: list[tuple[str, list, float]], name: str
) -> dict:
    """Run the U-Net stage's CLI on a LUNA16-layout folder; fraction of ``truth`` it hits."""
    out = Path(args.work) / f"unet_{name}.csv"
    if not out.is_file():
        cmd = [sys.executable, "-m", "unet_candidates", "extract", "--data", str(folder),
               "--folds", folds, "--model", str(args.unet_model), "--out", str(out), "--quiet"]  # fmt: skip
        log("running " + " ".join(cmd))
        subprocess.run(cmd, check=True)
    marks: dict[str, list] = {}
    with out.open() as f:
        for r in csv.DictReader(f):
            marks.setdefault(r["seriesuid"], []).append(
                [float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])]
            )
    hits = 0
    for uid, centre, diameter in truth:
        m = np.asarray(marks.get(uid, []), dtype=float).reshape(-1, 3)
        if len(m) and np.min(np.sum((m - centre) ** 2, axis=1)) < (diameter / 2.0) ** 2:
            hits += 1
    per_scan = float(np.mean([len(v) for v in marks.values()])) if marks else 0.0
    return {"found": hits, "total": len(truth), "fraction": round(hits / max(1, len(truth)), 4),
            "candidates_per_scan": round(per_scan, 1)}  # fmt: skip


def same_site_cubes(args, injector: Path, remover: Path, info: list[dict], plan) -> np.ndarray:
    """Replace each real nodule by an injected one at the same place: remove, then inject.

    The fake cube then has the real nodule's own context, so a classifier can only tell the two
    apart by the nodule (and by traces of the pasting), not by where the site is.
    """
    inj = CubeTamperer.from_dir(injector, seed=args.seed + 3)
    rem = CubeTamperer.from_dir(remover, seed=args.seed + 4)
    cubes = []
    scans: dict[str, object] = {}
    for item in info:
        if item["path"] not in scans:
            scans = {item["path"]: read_scan(item["path"])}
        scan = scans[item["path"]]
        cleaned = rem.remove(scan, item["center"])
        size = item["diameter_mm"] if inj.sized else None  # the same size, where one can be asked
        tampered, nodule = inj.inject(cleaned, item["center"], size)
        centre = nodule.center if nodule.diameter_mm > 0 else item["center"]
        cubes.append(cut_cube(tampered.array, tampered.geometry, centre, plan.cube_size))
    return np.asarray(cubes, dtype=np.float32)


def removal_check(args, remover: Path, real_info: list[dict], plan) -> tuple[dict, list]:
    tamperer = CubeTamperer.from_dir(remover, seed=args.seed + 2)
    before, after, examples = [], [], []
    for info in real_info:
        scan = read_scan(info["path"])
        new = tamperer.remove(scan, info["center"])
        r = max(1, round(info["diameter_mm"] / 4))
        c = plan.cube_size // 2
        b = cut_cube(scan.array, scan.geometry, info["center"], plan.cube_size)
        a = cut_cube(new.array, new.geometry, info["center"], plan.cube_size)
        before.append(float(b[c - r : c + r, c - r : c + r, c - r : c + r].mean()))
        after.append(float(a[c - r : c + r, c - r : c + r, c - r : c + r].mean()))
        if len(examples) < 6:
            examples.append((scan, new, info["center"], info["diameter_mm"]))
    before, after = np.asarray(before), np.asarray(after)
    return {
        "n": len(before),
        "centre_hu_before_mean": round(float(before.mean()), 1),
        "centre_hu_after_mean": round(float(after.mean()), 1),
        "fraction_parenchyma_after": round(float(np.mean(after < -600)), 4),
        "fraction_parenchyma_before": round(float(np.mean(before < -600)), 4),
    }, examples


def figure(
    path: Path, injector: Path, test_real: np.ndarray, test_info, inj_examples, rem_examples
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lungct.fileio import atomic_path
    from lungct.preprocess import WINDOWS

    tamperer = CubeTamperer.from_dir(injector)
    plan = tamperer.plan
    rows = min(6, len(test_real), len(inj_examples), len(rem_examples))
    titles = [
        "condition",
        "generated",
        "real (held out)",
        "before",
        "injected",
        "before",
        "removed",
    ]
    fig, axes = plt.subplots(rows, 7, figsize=(14, 2.1 * rows + 0.6), squeeze=False)
    hole = plan.hole_slice
    view = 40
    for r in range(rows):
        real = test_real[r]
        cond = real.copy()
        cond[hole, hole, hole] = tamperer.normaliser.inverse(np.zeros(1))[0]
        gen = tamperer.generate(real, test_info[r]["diameter_mm"] if tamperer.sized else None)
        slices = [cond, gen, real]
        radii = [0.0, 0.0, 0.0]
        for old, new, centre, diameter in (inj_examples[r], rem_examples[r]):
            slices += [
                cut_cube(old.array, old.geometry, centre, view),
                cut_cube(new.array, new.geometry, centre, view),
            ]
            radii += [diameter / 2 + 3, diameter / 2 + 3]
        for col, (cube, radius) in enumerate(zip(slices, radii, strict=True)):
            ax = axes[r, col]
            ax.imshow(
                cube[cube.shape[0] // 2],
                cmap="gray",
                vmin=WINDOWS["lung"][0],
                vmax=WINDOWS["lung"][1],
            )
            if radius:
                c = (cube.shape[1] - 1) / 2
                ax.add_patch(plt.Circle((c, c), radius, fill=False, ec="#ff3b30", lw=1.0))
            if col == 4:
                ax.set_xlabel(f"{inj_examples[r][3]:.1f} mm", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[col], fontsize=9)
    fig.suptitle(
        "CT-GAN on held-out synthetic scans: injector on real nodule cubes (32 mm) | the first "
        "injection in each scan (40 mm, estimated diameter) | removal of a real nodule (40 mm); "
        "axial middle slices, lung window",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.965))
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--train-folds", default="0-7")
    p.add_argument("--test-folds", default="8-9")
    p.add_argument("--plan", default="default")
    p.add_argument("--set", action="append", default=[], help="plan override for both models")
    p.add_argument("--injector-minutes", type=float, default=11.0)
    p.add_argument("--remover-minutes", type=float, default=4.0)
    p.add_argument("--per-scan", type=int, default=2)
    p.add_argument("--juxtapleural-fraction", type=float, default=0.25)
    p.add_argument("--unet-model", help="trained unet_candidates model folder")
    p.add_argument("--figure", help="PNG for the README (e.g. docs/ct_gan_grid.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(args)}

    injector = train_if_needed(args, "injector", args.injector_minutes, args.set)
    remover = train_if_needed(args, "remover", args.remover_minutes, args.set)
    for kind, folder in (("injector", injector), ("remover", remover)):
        m = ModelManifest.load(folder)
        results[kind] = {"steps": m.steps_done, "train_seconds": m.train_seconds, "final": m.final,
                         "n_cubes": m.n_cubes}  # fmt: skip
    plan = CubeTamperer.from_dir(injector).plan

    aug = work / "augmented"
    if not (aug / "augment_manifest.json").is_file():
        log("augmenting the training folds")
        t0 = time.perf_counter()
        report = augment_dataset(
            args.data, injector, aug, parse_folds(args.train_folds), args.per_scan,
            cache_dir=args.cache, juxtapleural_fraction=args.juxtapleural_fraction,
            seed=args.seed, progress=not args.quiet,
        )  # fmt: skip
        report["seconds"] = round(time.perf_counter() - t0, 1)
        write_json_atomic(work / "augment_report.json", report)
    results["augment"] = json.loads((work / "augment_report.json").read_text())
    log(f"augment: {results['augment']}")

    held = work / "heldout_injected"
    log("injecting into the held-out folds (evaluation only)")
    test_rows = inject_held_out(args, injector, held)
    train_rows = augmented_rows(aug)

    log("cutting cubes")
    train_real, train_info = real_cubes(args, parse_folds(args.train_folds), plan)
    test_real, test_info = real_cubes(args, parse_folds(args.test_folds), plan)
    train_fake = fake_cubes(aug, train_rows, plan)
    test_fake = fake_cubes(held, test_rows, plan)
    results["injected_diameter_mm"] = {
        "train_mean": round(float(np.mean([r["diameter_mm"] for r in train_rows])), 2),
        "heldout_mean": round(float(np.mean([r["diameter_mm"] for r in test_rows])), 2),
        "real_train_mean": None,
    }
    log(
        f"cubes: train real {len(train_real)} fake {len(train_fake)}; test real {len(test_real)} fake {len(test_fake)}"
    )
    results["realism"] = realism_auc(train_real, train_fake, test_real, test_fake, seed=args.seed)
    log(f"realism: {json.dumps(results['realism'])}")

    log("same-site realism: real nodules replaced by injected ones (remove, then inject)")
    same_train = same_site_cubes(args, injector, remover, train_info, plan)
    same_test = same_site_cubes(args, injector, remover, test_info, plan)
    np.savez_compressed(
        work / "cubes.npz", train_real=train_real, train_fake=train_fake, test_real=test_real,
        test_fake=test_fake, same_train=same_train, same_test=same_test,
    )  # fmt: skip
    results["realism_same_site"] = realism_auc(
        train_real, same_train, test_real, same_test, seed=args.seed
    )
    log(f"realism (same sites): {json.dumps(results['realism_same_site'])}")

    log("removal check on held-out real nodules")
    results["removal"], rem_examples = removal_check(args, remover, test_info, plan)
    log(f"removal: {results['removal']}")

    if args.unet_model:
        truth = [(r["seriesuid"], r["center"], r["diameter_mm"]) for r in test_rows]
        results["unet_injected"] = unet_recall(args, held, args.test_folds, truth, "injected")
        real_truth = [(i["seriesuid"], i["center"], i["diameter_mm"]) for i in test_info]
        results["unet_real"] = unet_recall(
            args, Path(args.data), args.test_folds, real_truth, "real"
        )
        log(f"U-Net: injected {results['unet_injected']} real {results['unet_real']}")
    else:
        results["unet_injected"] = "not measured: no --unet-model given"

    if args.figure:
        inj_examples = []
        by_uid: dict = {}
        for r in test_rows:
            by_uid.setdefault(r["seriesuid"], r)
        for uid, r in list(by_uid.items())[:6]:
            old = read_scan(next(Path(args.data).glob(f"subset{r['fold']}/{r['source']}.mhd")))
            new = read_scan(held / f"subset{r['fold']}" / f"{uid}.mhd")
            inj_examples.append((old, new, r["center"], r["diameter_mm"]))
        figure(Path(args.figure), injector, test_real, test_info, inj_examples, rem_examples)
        log(f"figure: {args.figure}")
    write_json_atomic(work / "acceptance.json", results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
