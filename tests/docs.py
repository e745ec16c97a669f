"""Where the documentation lives, for the tests that check what it says.

The README is a quickstart; everything else is one page per topic under docs/
(docs/README.md is the index). Tests read the page that holds their examples.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def doc(name: str) -> str:
    """The text of one docs page, by file name (``"settings.md"``)."""
    return (DOCS / name).read_text(encoding="utf-8")


def pages() -> list[Path]:
    """The README and every Markdown page under docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]
