"""docs/reference is generated from the code (scripts/gen_reference.py) and must not go stale."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO
from lungct.__main__ import build_parser


def _load_generator():
    # Registered in sys.modules before it runs: its dataclasses look their module up there.
    if "gen_reference" not in sys.modules:
        path = REPO / "scripts" / "gen_reference.py"
        spec = importlib.util.spec_from_file_location("gen_reference", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gen_reference"] = module
        spec.loader.exec_module(module)
    return sys.modules["gen_reference"]


gen = _load_generator()


def test_reference_pages_match_the_code() -> None:
    stale = [p.relative_to(gen.REPO).as_posix() for p in gen.stale_pages()]
    assert not stale, f"stale: {stale}; run `python scripts/gen_reference.py` and commit the pages"


def test_check_fails_on_a_stale_page_and_passes_once_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(gen, "REFERENCE", tmp_path / "reference")
    assert gen.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stale reference pages" in err and "gen_reference.py" in err
    assert gen.main([]) == 0
    assert sorted(p.name for p in (tmp_path / "reference").iterdir()) == [
        "commands.md",
        "plans.md",
    ]
    assert gen.main(["--check"]) == 0
    page = tmp_path / "reference" / "commands.md"
    page.write_text(page.read_text() + "edited by hand\n")
    assert gen.main(["--check"]) == 1


def test_a_new_flag_changes_the_commands_page() -> None:
    parser = build_parser()
    before = gen.render_commands([parser])
    info = next(sub for name, _, sub in gen._subcommands(parser) if name == "info")
    info.add_argument("--brand-new-flag", help="a flag nobody documented")
    after = gen.render_commands([parser])
    assert before != after
    assert "`--brand-new-flag BRAND_NEW_FLAG` | a flag nobody documented |" in after


def test_every_command_and_argument_is_on_the_page() -> None:
    text = gen.render_commands(gen.package_parsers())
    for parser in gen.package_parsers():
        for _name, _help, sub in gen._subcommands(parser):
            assert f"`{sub.prog}`" in text
            for action in sub._actions:
                for option in action.option_strings:
                    assert option in text, (sub.prog, option)


def _plan_class(with_new_field: bool) -> type:
    @dataclass(frozen=True)
    class DemoPlan:
        """A plan for the test.

        Args:
            size: edge in voxels.
            depth, width: the network's shape.
        """

        size: int = 32
        depth: int = 3
        width: float = 1.5
        if with_new_field:
            window: tuple[float, float] = (-1000.0, 400.0)

    return DemoPlan


def test_a_new_plan_field_changes_the_plans_page() -> None:
    before, missing_before = gen.render_plans([gen.PlanSpec(_plan_class(False), "a test")])
    after, missing_after = gen.render_plans([gen.PlanSpec(_plan_class(True), "a test")])
    assert before != after
    assert "| `size` | integer | `32` | edge in voxels. |" in before
    assert "| `width` | number | `1.5` | the network's shape. |" in before
    assert missing_before == []
    assert f"| `window` | list of 2 numbers | `[-1000.0, 400.0]` | {gen.NO_DESCRIPTION} |" in after
    assert missing_after == ["DemoPlan.window"]


def test_chained_args_entries_are_split_per_field() -> None:
    from unet_candidates.config import UNetPlan

    text = gen.field_descriptions(UNetPlan)
    assert text["flip"] == "random flips along every axis"
    assert text["rot90"] == "random 90-degree rotations in the axial plane"
    assert text["epochs"] == text["steps_per_epoch"]
    assert text["fn_weight"].startswith("Tversky weight of false negatives")


def test_markdown_cells_are_escaped() -> None:
    assert gen.md_text("a | b <out>.csv *.mhd `x|y`") == "a \\| b &lt;out&gt;.csv \\*.mhd `x\\|y`"
