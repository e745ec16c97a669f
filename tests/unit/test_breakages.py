"""The named breakages still apply to the tree: each anchor matches exactly once.

``python -m tests.breakages`` shows each promise's tests fail when its mechanism
is broken; a breakage whose anchor moved away would show nothing. This test
runs with the suite, so a change that moves an anchor says so at once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.breakages import BREAKAGES, ROOT, AnchorError, Breakage, apply


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda b: b.name)
def test_each_breakage_applies_exactly_once_and_changes_its_file(
        breakage: Breakage, tmp_path: Path) -> None:
    target = tmp_path / breakage.path
    target.parent.mkdir(parents=True)
    shutil.copy(ROOT / breakage.path, target)
    apply(breakage, tmp_path)
    assert target.read_text() != (ROOT / breakage.path).read_text()
    assert breakage.tests


def test_a_breakage_whose_anchor_moved_fails_loudly(tmp_path: Path) -> None:
    (tmp_path / "f.py").write_text("x = 1\nx = 1\n")
    with pytest.raises(AnchorError, match="anchor not found"):
        apply(Breakage("gone", "", "f.py", r"y = 2", "", ("t",)), tmp_path)
    with pytest.raises(AnchorError, match="anchor matches 2 places"):
        apply(Breakage("twice", "", "f.py", r"x = 1", "", ("t",)), tmp_path)
