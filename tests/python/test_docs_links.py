"""Every relative link in README.md and docs/*.md resolves to a file of the repository (and its #anchor to a heading),
and no document cites a markdown file that is not in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN_MD = re.compile(r"`([\w./-]+\.md)(?:#[\w-]+)?`")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _text(path: Path) -> str:
    return FENCE.sub("", path.read_text())  # code blocks are not links


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading))


def _anchors(path: Path) -> set:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", _text(path), re.M)}


def _links(path: Path) -> list:
    return [a or b for a, b in LINK.findall(_text(path))]


def test_the_docs_exist():
    names = {p.name for p in DOCS}
    assert {"README.md", "semantics.md", "errors.md"} <= names


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_relative_links_resolve(doc):
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists() or ROOT not in dest.parents and dest != ROOT:
            broken.append(f"{target}: no such file in the repository")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_cited_markdown_files_exist(doc):
    """A markdown file named in a code span (`docs/x.md`) is a citation too: it must be in the repository."""
    missing = []
    for name in CODE_SPAN_MD.findall(_text(doc)):
        candidates = [doc.parent / name, ROOT / name, ROOT / "docs" / name]
        if not any(c.exists() for c in candidates):
            missing.append(name)
    assert not missing, f"{doc.relative_to(ROOT)} cites files that are not in the repository: {missing}"
    assert "DESIGN §" not in doc.read_text(), "DESIGN.md is not part of the repository"
