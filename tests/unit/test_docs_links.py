"""The README and the docs pages link to files and headings that exist, and the index
lists every page: moving a section must not leave a link pointing at nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs import DOCS, README, ROOT, pages

#: [text](target), not an image, outside fenced code blocks.
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", _prose(page.read_text()), re.MULTILINE)
    return {_anchor(heading) for heading in headings}


def _relative_links() -> list[tuple[str, str]]:
    found = []
    for page in pages():
        for target in LINK.findall(_prose(page.read_text())):
            if not re.match(r"[a-z]+:", target):
                found.append((str(page.relative_to(ROOT)), target))
    return found


def test_anchors_are_spelled_as_github_spells_them() -> None:
    assert _anchor("Flower and `celery events`") == "flower-and-celery-events"
    assert _anchor("Onebox's limits: a shared rate limit and a circuit breaker") == (
        "oneboxs-limits-a-shared-rate-limit-and-a-circuit-breaker")
    assert _anchor("Throughput at 50 ms per call") == "throughput-at-50-ms-per-call"


def test_there_are_links_to_check() -> None:
    assert len(_relative_links()) >= 20


@pytest.mark.parametrize(("page", "target"), _relative_links())
def test_every_relative_link_resolves(page: str, target: str) -> None:
    path, _, anchor = target.partition("#")
    resolved = (ROOT / page).parent / path if path else ROOT / page
    assert resolved.exists(), f"{page}: {target}: no such file"
    if anchor:
        assert resolved.suffix == ".md", f"{page}: {target}: anchor into a non-Markdown file"
        assert anchor in _anchors(resolved), f"{page}: {target}: no such heading"


def test_the_index_and_the_readme_link_every_docs_page() -> None:
    index = (DOCS / "README.md").read_text()
    readme = README.read_text()
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not list {page.name}"
            assert f"](docs/{page.name}" in readme, f"README.md does not link {page.name}"
