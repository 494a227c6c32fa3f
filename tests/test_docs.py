"""The user docs stand alone: every relative link in README.md and docs/ names a file of the
repository (and, with #anchor, a heading of it), and the README stays a user guide (≤ 200 lines)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", path.read_text(), re.M)}


def test_every_relative_link_resolves():
    broken, seen = [], 0
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            seen += 1
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken
    assert seen > 20  # the docs do link to each other: the pattern finds them


def test_the_anchor_rule_by_hand():
    assert _anchor("Several processes: FSDP2 + torchrun") == "several-processes-fsdp2--torchrun"


def test_readme_is_a_user_guide():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "DESIGN.md" not in text and "ENVIRONMENT.md" not in text  # engineers' files, not in the repository
