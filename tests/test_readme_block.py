"""The README's stage-by-stage block, run exactly as written (tiny training budgets).

The block is read from README.md at test time, so a change to the README is what gets tested.
Only the three budget variables it documents are set; every file it uses must be made by one of
its own commands.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def stage_by_stage_block(readme: str) -> str:
    """The first ```bash block under the README's "## Stage by stage" heading."""
    section = readme.split("## Stage by stage", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert match, "no bash block under 'Stage by stage'"
    return match.group(1)


def test_the_block_is_found_and_makes_every_file_it_reads() -> None:
    block = stage_by_stage_block((ROOT / "README.md").read_text())
    assert "python -m lungct synth" in block and "python -m integration detect" in block
    # Every relative file a command reads is written earlier in the block (or by synth).
    made = {"data", "cache"}
    for line in block.splitlines():
        for name in re.findall(r">\s*([\w./-]+)", line):
            made.add(name.split("/")[0])
        for name in re.findall(r"--out\s+([\w./-]+)", line):
            made.add(name.split("/")[0])
        for name in re.findall(r"--(?:seriesuids|results|candidates|excluded)\s+([\w./-]+)", line):
            assert name.split("/")[0] in made, f"{name} is read before any command makes it"


@pytest.mark.slow
def test_the_stage_by_stage_block_runs_as_written(tmp_path: Path) -> None:
    block = stage_by_stage_block((ROOT / "README.md").read_text())
    script = tmp_path / "block.sh"
    script.write_text("set -euo pipefail\n" + block)
    env = dict(os.environ)
    env.update(
        UNET_MINUTES="0.15",
        GAN_MINUTES="0.1",
        FPR_MINUTES="0.15",
        PYTHONPATH=str(ROOT),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    result = subprocess.run(
        ["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    # The files each stage promises, made by the block itself.
    for name in (
        "seriesuids_9.csv",
        "candidates_9.csv",
        "submission_9.csv",
        "eval/metrics.json",
        "eval_candidates/metrics.json",
        "augmented/candidates.csv",
        "models/unet/model.keras",
        "models/gan/manifest.json",
        "models/fpr/model.keras",
        "detect_out/report.html",
        "detect_out/summary.json",
    ):
        assert (tmp_path / name).is_file(), name
    # The augmented copies were prepared and the MGI-CNN trained on them.
    manifest = json.loads((tmp_path / "models/fpr/manifest.json").read_text())
    assert any(".ctgan" in uid for uid in manifest["train_series"])
    # The evaluation read the excluded findings and the held-out subset only.
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert metrics["scans"] == len((tmp_path / "seriesuids_9.csv").read_text().split())
