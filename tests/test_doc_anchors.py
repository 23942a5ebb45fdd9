"""Every anchor into docs/design.md that the repository cites (code, tests, READMEs) names one of
its headings, by GitHub's rule for heading anchors: a dead one sends a reader, or a user reading
an error message, to the top of a long file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"design\.md#([A-Za-z0-9_-]+)")


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (hyphens and underscores kept),
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_cited_design_anchor_is_a_heading():
    text = (ROOT / "docs" / "design.md").read_text()
    anchors = {github_anchor(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}
    files = [
        p
        for pattern in ("attention/**/*.py", "tests/*.py", "perf/**/*.py", "*.md", "perf/*.md", "docs/*.md", "*.py")
        for p in ROOT.glob(pattern)
    ]
    dead = sorted(
        f"{path.relative_to(ROOT)}: #{anchor}"
        for path in set(files)
        for anchor in CITED.findall(path.read_text())
        if anchor not in anchors
    )
    assert len(anchors) > 30 and len(files) > 50
    assert not dead, dead
