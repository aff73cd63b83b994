"""Every command: `--help` without TensorFlow, no TensorFlow start-up lines on stderr, and a plan
value of the wrong type refused with the field and the type it needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from lungct.errors import LungCTError
from lungct.quiet import filtered_stderr, is_startup_noise

PACKAGES = ("lungct", "unet_candidates", "fp_reduction_3dcnn", "ct_gan_augment", "integration")

# Runs `python -m PKG --help`, then `PKG SUB --help` for every subcommand, in one process; prints
# the exit codes and whether TensorFlow or Keras got imported.
HELP_PROBE = """
import argparse, contextlib, importlib, io, json, runpy, sys
package = sys.argv[1]
codes = {}
with contextlib.redirect_stdout(io.StringIO()):
    sys.argv = [package, "--help"]
    try:
        runpy.run_module(package, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        codes["--help"] = exc.code
    parser = importlib.import_module(package + ".__main__").build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name in action.choices:
                try:
                    parser.parse_args([name, "--help"])
                except SystemExit as exc:
                    codes[name] = exc.code
print(json.dumps({"codes": codes, "tensorflow": "tensorflow" in sys.modules,
                  "keras": "keras" in sys.modules}))
"""

# Runs a command as `python -m` would; prints its exit status and whether TensorFlow was loaded.
RUN_PROBE = """
import json, runpy, sys
package, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(package, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "tensorflow": "tensorflow" in sys.modules}))
"""


def _run(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_help_of_every_command_does_not_import_tensorflow(package: str) -> None:
    result = _run(HELP_PROBE, package)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["codes"]) >= 2 and set(report["codes"].values()) == {0}, report
    assert not report["tensorflow"] and not report["keras"], (
        f"`python -m {package} ... --help` imports TensorFlow/Keras: import it inside the "
        "function that needs it"
    )
    assert result.stderr == ""


def test_a_failing_command_that_loaded_tensorflow_prints_one_line(tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "GLOG_minloglevel")
    }
    scan, out = tmp_path / "missing.mhd", tmp_path / "out"
    result = _run(
        RUN_PROBE, "integration", "detect", "--scan", str(scan), "--out", str(out), env=env
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tensorflow"], "the detector no longer loads TensorFlow: pick another command"
    assert report["code"] == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(scan) in lines[0]
    assert not out.exists()


ABSL_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    "I0000 00:00:1796470333.392212   28579 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.\n",
    "E0000 00:00:1796470339.277213   28579 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
    "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n",
]


def test_startup_noise_is_judged_by_tf_cpp_min_log_level() -> None:
    assert [is_startup_noise(line, 3) for line in ABSL_LINES] == [True, True, True]
    assert [is_startup_noise(line, 2) for line in ABSL_LINES] == [True, True, False]
    assert [is_startup_noise(line, 0) for line in ABSL_LINES] == [False, False, False]
    assert not is_startup_noise("Traceback (most recent call last):\n", 3)
    assert not is_startup_noise("error: scan.mhd: no such file or folder\n", 3)


def test_filtered_stderr_passes_on_everything_else(capfd: pytest.CaptureFixture) -> None:
    with filtered_stderr(level=3):
        for line in ABSL_LINES:
            os.write(2, line.encode())
        os.write(2, b"a real problem\n")
        print("from python", file=sys.stderr)
    # (under capfd, print() does not go through file descriptor 2, so the order may differ)
    assert sorted(capfd.readouterr().err.splitlines()) == ["a real problem", "from python"]


# --------------------------------------------------------------------------------------------
# Plan values of the wrong type
# --------------------------------------------------------------------------------------------


def _load_unet(path: Path):
    from unet_candidates.config import UNetPlan

    return UNetPlan.load(path)


def _load_fpr(path: Path):
    from fp_reduction_3dcnn.config import get_plan

    return get_plan(path)


def _load_gan(path: Path):
    from ct_gan_augment.config import get_plan

    return get_plan(path)


def _load_preprocess(path: Path):
    from lungct.preprocess import PreprocessPlan

    return PreprocessPlan.load(path)


def _load_pipeline(path: Path):
    from integration.pipeline import PipelineConfig

    return PipelineConfig.load(path.parent)


def _load_recipe(path: Path):
    from integration.recipe import Recipe

    return Recipe.load(path)


@pytest.mark.parametrize(
    ("load", "plan", "message"),
    [
        (_load_unet, {"epochs": "forty"}, "epochs must be an integer, got 'forty'"),
        (_load_unet, {"batch_norm": "yes"}, "batch_norm must be true or false, got 'yes'"),
        (_load_unet, {"spacing": [1, "a", 2]}, "spacing must be a list of 3 numbers"),
        (_load_fpr, {"batch_size": 12.5}, "batch_size must be an integer, got 12.5"),
        (_load_fpr, {"patch_sizes": [[40, 40, "26"]]}, "must be a list of lists of 3 integers"),
        (_load_gan, {"rotate": 1}, "rotate must be true or false, got 1"),
        (_load_gan, {"gf": "8"}, "gf must be an integer, got '8'"),
        (_load_preprocess, {"spacing": 1.0}, "spacing must be a list of 3 numbers, got 1.0"),
        (_load_pipeline, {"threshold": "0.5"}, "threshold must be a number, got '0.5'"),
        (
            _load_recipe,
            {"name": "r", "split": {"train": "0-7", "val": [8], "test": [9]}},
            "split must be a JSON object of lists of integers",
        ),
    ],
)
def test_a_plan_value_of_the_wrong_type_names_the_field_and_type(
    tmp_path: Path, load, plan: dict, message: str
) -> None:
    path = tmp_path / ("pipeline.json" if load is _load_pipeline else "plan.json")
    path.write_text(json.dumps(plan))
    with pytest.raises(LungCTError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_cli_plan_of_the_wrong_type_is_one_error_line(tmp_path: Path, capsys) -> None:
    from ct_gan_augment.config import get_plan
    from fp_reduction_3dcnn.__main__ import main

    path = tmp_path / "plan.json"
    path.write_text('{"epochs": "40"}')
    assert main(["plan", "--plan", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: {path}: epochs must be an integer, got '40'\n"
    with pytest.raises(LungCTError, match="gf must be an integer, got 'abc'"):
        get_plan("default", gf="abc")  # ct_gan_augment train --set gf=abc
