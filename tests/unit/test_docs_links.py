"""Every relative link in the README, the guides, the job READMEs and the research studies points at a file that
exists and, where it names a section, at a heading of that file (GitHub's anchors). The guides cross-reference each
other heavily, and a renamed section would otherwise break links without a word."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted(
    [
        REPO / "README.md",
        *(REPO / "docs").rglob("*.md"),
        *(REPO / "jobs").glob("*/README.md"),
        *(REPO / "research").rglob("*.md"),
    ]
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks (a '# comment' in a bash block is no heading)."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


@functools.cache
def github_anchors(path: Path) -> frozenset[str]:
    """The anchors GitHub gives the file's headings: lower case, punctuation dropped, spaces to hyphens, and -1,
    -2, ... for repeats. Cached: the guides link into the same few files hundreds of times."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(path):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        anchors.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return frozenset(anchors)


def relative_links(path: Path) -> list[str]:
    links = []
    for line in prose_lines(path):
        for target in LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked here
                links.append(target)
    return links


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path):
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in github_anchors(linked):
            broken.append(f"{target}: no heading with anchor #{anchor} in {linked.relative_to(REPO)}")
    assert not broken, f"{doc.relative_to(REPO)} has broken links:\n" + "\n".join(broken)


def test_the_anchor_rule_matches_githubs_on_this_repos_headings(tmp_path: Path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "# Keeping Adam's state at the site\n## The clip, not the noise: fewer passes\n```bash\n# not a heading\n```\n"
        "## Site-level DP: `unet3d_fedbn_dp`\n## Limits\n## Limits\n"
    )
    assert github_anchors(doc) == {
        "keeping-adams-state-at-the-site",
        "the-clip-not-the-noise-fewer-passes",
        "site-level-dp-unet3d_fedbn_dp",
        "limits",
        "limits-1",
    }
