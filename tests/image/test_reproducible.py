"""Two builds of the same commit give identical artefact digests (slow: two full builds).

Both build one clone of HEAD, so what is being edited in the working tree meanwhile cannot make
them differ."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.image.conftest import require_root_build_tools
from tests.image.images import artefact_digests, build, snapshot

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # two builds of ~7 min


def test_two_builds_of_the_same_tree_give_identical_digests(tmp_path: Path) -> None:
    require_root_build_tools()
    tree = snapshot(tmp_path / "src")
    first = artefact_digests(build("prod", tmp_path / "a", repo=tree))
    second = artefact_digests(build("prod", tmp_path / "b", repo=tree))
    differing = sorted(name for name in first if first[name] != second.get(name))
    assert differing == [], f"not reproducible: {differing}"
    assert first.keys() == second.keys()
