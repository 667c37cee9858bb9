"""The docs read as a reference: no narrative of how figures were measured, links that resolve, and
a benchmarks page in which every figure has its date and command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
LINKED_PAGES = PAGES + [ROOT / "CHANGELOG.md"]
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
MAX_BENCHMARK_LINES = 460

# The history of the measurements lives in git and CHANGELOG.md, not in the docs. These patterns
# cover sittings, other people's jobs on the machine and hardware that was not at hand.
NARRATIVE = [
    r"\bsessions?\b",
    r"\bsittings?\b",
    r"\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|next|last|previous|earlier|later|this) (session|sitting|round of measurements)",
    r"\bthis round\b",
    r"\bengineers?'s? (jobs?|benchmarks?|runs?|tests?)\b",
    r"\banother (job|benchmark|person|agent)'s\b",
    r"\bother (engineers|people|agents)\b",
    r"\b(other|another) [\w' ]*jobs? (shared|ran|were running)",
    r"\bshared (the|this) (machine|cpu|cores|vm)\b",
    r"\b(machine|cpu|cores|vm) (was |were )?shared with\b",
    r"\b(no|a) gpu (was|were) (lent|available)",
    r"\b(was|were|is|are) not lent\b",
    r"\blent\b",
    r"\bat the time\b",
    r"\bmy (analysis|scripts?|runs?)\b",
    r"\bwe did not\b",
]


def _strip_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_narrative_of_measuring(page):
    text = page.read_text()
    found = [(number, match.group(0)) for number, line in enumerate(text.splitlines(), 1)
             for pattern in NARRATIVE for match in re.finditer(pattern, line, flags=re.I)]
    assert found == []


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", _strip_code_blocks(page.read_text()), flags=re.M):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda path: str(path.relative_to(ROOT)))
def test_links_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _strip_code_blocks(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert broken == []


def test_benchmarks_page_is_a_short_reference():
    text = BENCHMARKS.read_text()
    assert len(text.splitlines()) <= MAX_BENCHMARK_LINES
    sections = re.split(r"^## ", text, flags=re.M)[1:]
    assert sections[0].startswith("Index")
    date = re.compile(r"\b20\d\d-\d\d-\d\d\b")
    command = re.compile(r"`(\.venv/bin/)?python benchmarks/|`make bench")
    for section in sections[1:]:
        name = section.splitlines()[0]
        assert date.search(section), f"no date in section {name!r}"
        assert command.search(section), f"no command in section {name!r}"
    index_rows = [row for row in sections[0].splitlines() if row.startswith("| ") and not row.startswith("| question")]
    assert len(index_rows) >= 10
    for row in index_rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert date.fullmatch(cells[-1]) or (cells[-1] == "–" and "not measured" in row), row
        assert cells[-2].startswith("`"), row
