"""The user documentation stays short, linked and free of development history.

Checks README.md, CHANGELOG.md and every docs/**/*.md page: the README's length, every relative
link (and image) resolving to a file in the repository, no path outside the repository, and no
talk of rounds of development work. Plain text only: no TensorFlow, well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

# Generated from the code by scripts/gen_reference.py: a link to them counts before they exist.
GENERATED = {REPO / "docs" / "reference" / "commands.md", REPO / "docs" / "reference" / "plans.md"}

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and ![alt](target); the text may span lines, the target may carry a "title".
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...

OUTSIDE_PATHS = [
    re.compile(r"\.\./shared\b"),
    re.compile(r"(?<![\w.~-])/(?:work|home|Users|mnt|root)/"),
]
DEVELOPMENT_HISTORY = [
    re.compile(r"\bround\s+\d+", re.I),
    re.compile(r"\brounds?\s+of\s+(?:work|development)\b", re.I),
    # a numbered or named sitting of work, not a budget "over all resumed runs"
    re.compile(r"\bsessions?[\s-]*\d+", re.I),
    re.compile(r"\b(?:this|that|the same|an earlier|a later|previous|next|last) session\b", re.I),
]


def matches(text: str, patterns: list[re.Pattern[str]]) -> list[str]:
    """Every match of any pattern, with its line number."""
    return [
        f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
        for pattern in patterns
        for m in pattern.finditer(text)
    ]


def doc_pages() -> list[Path]:
    pages = [REPO / "README.md", REPO / "CHANGELOG.md"]
    pages += sorted((REPO / "docs").rglob("*.md"))
    return [p for p in pages if p.is_file()]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code (links there are examples)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def relative_links(text: str) -> list[str]:
    links = []
    for target in LINK.findall(prose(text)):
        if EXTERNAL.match(target) or target.startswith("#"):
            continue
        links.append(target)
    return links


def resolves(page: Path, target: str) -> bool:
    path = unquote(target.split("#", 1)[0].split("?", 1)[0])
    if not path:
        return True
    resolved = (REPO / path.lstrip("/")) if path.startswith("/") else (page.parent / path)
    resolved = resolved.resolve()
    if resolved in GENERATED and not resolved.exists():
        return True  # written by scripts/gen_reference.py
    return resolved.is_relative_to(REPO) and resolved.is_file()


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def test_readme_is_short() -> None:
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; at most {README_MAX_LINES} (move detail into docs/)"
    )


def test_the_pages_are_found() -> None:
    names = {page_id(p) for p in doc_pages()}
    assert {"README.md", "CHANGELOG.md", "docs/README.md"} <= names


@pytest.mark.parametrize("page", doc_pages(), ids=page_id)
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    broken = [t for t in relative_links(text) if not resolves(page, t)]
    assert not broken, f"{page_id(page)}: links to missing files: {broken}"


@pytest.mark.parametrize("page", doc_pages(), ids=page_id)
def test_no_paths_outside_the_repository(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    found = matches(text, OUTSIDE_PATHS)
    assert not found, f"{page_id(page)} names paths outside the repository: {found}"


@pytest.mark.parametrize("page", doc_pages(), ids=page_id)
def test_no_development_history(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    found = matches(text, DEVELOPMENT_HISTORY)
    assert not found, f"{page_id(page)} speaks of rounds of development work: {found}"


def test_the_checks_catch_what_they_should() -> None:
    """The patterns themselves: a broken link, a link in code, an anchor, an outside path."""
    page = REPO / "docs" / "README.md"
    text = (
        "[ok](../README.md#two-commands) [web](https://example.org) [top](#top)\n"
        "![fig](missing.png) `[code](nowhere.md)`\n```\n[block](nowhere.md)\n```\n"
        "[split\ntext](how-to/gpu.md)\n"
    )
    links = relative_links(text)
    assert links == ["../README.md#two-commands", "missing.png", "how-to/gpu.md"]
    assert [resolves(page, t) for t in links] == [True, False, True]
    assert not resolves(page, "../../outside.md")
    assert resolves(page, "reference/plans.md")  # generated: exists or will
    assert any(p.search("see ../shared/docs") for p in OUTSIDE_PATHS)
    assert any(p.search("at /work/main/x") for p in OUTSIDE_PATHS)
    assert not any(p.search("a background 1.3.6 scan, 10/work/ratio") for p in OUTSIDE_PATHS)
    assert any(p.search("in Round 4 we") for p in DEVELOPMENT_HISTORY)
    assert any(p.search("the session-7 run") for p in DEVELOPMENT_HISTORY)
    assert any(p.search("(session 6)") for p in DEVELOPMENT_HISTORY)
    assert any(p.search("earlier in this session") for p in DEVELOPMENT_HISTORY)
    assert not any(p.search("--background 1.3.6....mhd") for p in DEVELOPMENT_HISTORY)
