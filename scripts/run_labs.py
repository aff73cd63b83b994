"""Run the teaching labs top to bottom, each on a fresh kernel, and write HTML copies.

    python scripts/run_labs.py                 # every labs/[0-9]*.ipynb, normal mode (make labs)
    python scripts/run_labs.py --quick         # quick mode (LUNGCT_LABS_QUICK=1): tiny data
    python scripts/run_labs.py labs/05-luna16-evaluation.ipynb

Each notebook runs on a new kernel of *this* Python (a kernel spec written to a temporary
folder names ``sys.executable``, so the venv's ``ipykernel`` is the one used, whatever kernels
the user has installed), in its own temporary working folder, so the data a lab generates
never lands in the repository. The notebooks in ``labs/`` are not modified. An HTML copy with
the outputs, figures embedded, is written to ``labs/html/<name>.html`` (temporary file, then
rename), also for a notebook that failed, so its error can be read there.

stdout gets one line per notebook with its wall time; progress goes to stderr. Exit status 1
when any notebook fails, with ``error: <notebook>: cell <n> of <cells> (<first line>): <error>``
on stderr (cells counted from 1, markdown cells included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from nbconvert import HTMLExporter

from lungct.fileio import write_text_atomic
from lungct.labs import QUICK_ENV
from lungct.quiet import QUIET_LEVEL

REPO = Path(__file__).resolve().parents[1]
LABS = REPO / "labs"
HTML_DIR = LABS / "html"
KERNEL_NAME = "lungct-labs"
CELL_TIMEOUT_S = 600
"""Longest a single cell may run (a normal-mode lab takes at most 5 minutes in all)."""


def lab_notebooks(labs_dir: Path = LABS) -> list[Path]:
    """The labs, in order: ``labs/[0-9]*.ipynb``."""
    return sorted(labs_dir.glob("[0-9]*.ipynb"))


@dataclass
class LabRun:
    """The outcome of one notebook run.

    Attributes:
        path: the notebook.
        notebook: the executed copy, with its outputs (as far as it got).
        seconds: wall time from kernel start to the last cell.
        failed_cell: index (0-based, counting every cell) of the cell that failed, or ``None``.
        error: ``"<name>: <value>"`` of the failure, or ``None``.
    """

    path: Path
    notebook: nbformat.NotebookNode
    seconds: float
    failed_cell: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether every cell ran without an error."""
        return self.error is None

    def describe_failure(self) -> str:
        """``cell <n> of <cells> (<its first line>): <error>``, cells counted from 1."""
        if self.failed_cell is None:
            return str(self.error)
        cells = self.notebook.cells
        first = cells[self.failed_cell].source.strip().splitlines()
        line = first[0] if first else ""
        return f"cell {self.failed_cell + 1} of {len(cells)} ({line!r}): {self.error}"


def _kernel_manager(spec_root: Path) -> KernelManager:
    """A kernel manager whose only kernel is ``sys.executable -m ipykernel_launcher``."""
    spec_dir = spec_root / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (lungnodule-suite labs)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    specs = KernelSpecManager(kernel_dirs=[str(spec_root)], ensure_native_kernel=False)
    # IPC sockets where there are Unix sockets: local only, and no warning about plain TCP.
    # The socket paths are absolute: the kernel runs in the lab's working folder, not ours.
    if os.name == "posix":
        ipc = {"transport": "ipc", "ip": str(spec_root / "kernel")}
    else:
        ipc = {}
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs, **ipc)


def run_notebook(
    path: str | os.PathLike,
    workdir: str | os.PathLike,
    quick: bool = False,
    timeout: int = CELL_TIMEOUT_S,
) -> LabRun:
    """Execute one notebook on a fresh kernel of this Python, in ``workdir``.

    Args:
        path: the ``.ipynb`` file (read, never written).
        workdir: the kernel's working folder (the lab writes its data there).
        quick: set ``LUNGCT_LABS_QUICK=1`` for the kernel (tiny data, a few steps); otherwise
            the variable is removed, so a normal run is normal whatever the caller's shell says.
        timeout: seconds a single cell may run.

    Returns:
        A :class:`LabRun`; a failing cell stops the run and is named in it, nothing raises.
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    env.pop(QUICK_ENV, None)
    if quick:
        env[QUICK_ENV] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_LEVEL)
    # The notebook imports the suite from this checkout, wherever its working folder is.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="lungct-kernel-") as spec_root:
        client = NotebookClient(
            nb,
            km=_kernel_manager(Path(spec_root)),
            timeout=timeout,
            resources={"metadata": {"path": str(workdir)}},
        )
        start = time.perf_counter()
        failed_cell, error = None, None
        try:
            # cleanup_kc: shut the kernel down at the end although we made its manager.
            with client.setup_kernel(env=env, cwd=str(workdir), cleanup_kc=True):
                for index, cell in enumerate(nb.cells):
                    if cell.cell_type != "code":
                        continue
                    try:
                        client.execute_cell(cell, index)
                    except CellExecutionError as exc:
                        failed_cell, error = index, f"{exc.ename}: {exc.evalue}"
                    except (CellTimeoutError, DeadKernelError) as exc:
                        failed_cell, error = index, f"{type(exc).__name__}: {exc}"
                    if error is not None:
                        break
        except RuntimeError as exc:  # the kernel did not start or answer
            if error is None:
                error = f"kernel: {exc}"
        seconds = time.perf_counter() - start
    return LabRun(path, nb, seconds, failed_cell, error)


def write_html(run: LabRun, html_dir: str | os.PathLike = HTML_DIR) -> Path:
    """Write the executed notebook as ``<html_dir>/<name>.html``, figures embedded."""
    exporter = HTMLExporter(embed_images=True)
    body, _ = exporter.from_notebook_node(run.notebook)
    target = Path(html_dir) / f"{run.path.stem}.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, body)
    return target


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python scripts/run_labs.py",
        description=(
            "Run the labs (labs/[0-9]*.ipynb) top to bottom, each on a fresh kernel in a "
            "temporary folder, print the wall time of each and write HTML copies with outputs."
        ),
    )
    parser.add_argument(
        "notebooks", nargs="*", type=Path, help="notebooks to run (default: every lab, in order)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"quick mode ({QUICK_ENV}=1): tiny data, a few steps, under a minute a lab",
    )
    parser.add_argument(
        "--html-dir", type=Path, default=HTML_DIR, help="where the HTML copies go (labs/html)"
    )
    parser.add_argument(
        "--timeout",
        type=int,
        default=CELL_TIMEOUT_S,
        help=f"seconds a single cell may run (default {CELL_TIMEOUT_S})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the labs; returns the exit status (1 when any failed)."""
    args = build_parser().parse_args(argv)
    notebooks = args.notebooks or lab_notebooks()
    if not notebooks:
        print(f"error: {LABS}: no lab notebooks found", file=sys.stderr)
        return 2
    mode = "quick" if args.quick else "normal"
    failures = []
    total = 0.0
    for path in notebooks:
        print(f"running {path.name} ({mode} mode) ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix=f"lab-{path.stem[:2]}-") as workdir:
            run = run_notebook(path, workdir, quick=args.quick, timeout=args.timeout)
        html = write_html(run, args.html_dir)
        total += run.seconds
        status = "ok" if run.ok else "FAILED"
        print(f"{path.name:44s} {run.seconds:6.1f} s  {status}", flush=True)
        print(f"  html: {html}", file=sys.stderr, flush=True)
        if not run.ok:
            failures.append(run)
    print(f"{'total':44s} {total:6.1f} s  ({mode} mode, {len(notebooks)} notebooks)", flush=True)
    for run in failures:
        print(f"error: {run.path}: {run.describe_failure()}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
