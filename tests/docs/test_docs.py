"""The documents as a new user meets them: every relative link resolves, the README's layout lists every module,
the README stays a front door, and no document speaks of how the project was developed.

Documents: README.md, docs/*.md and cluster/README.md. Markdown is parsed with markdown-it-py (the `test` extra),
so links inside code blocks are not links.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from urllib.parse import unquote

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "cluster" / "README.md"]
PACKAGES = ("gemma", "deployments")  # the README's layout must list every module of these
README_MAX_LINES = 220

# Words about the history of development, not about the software. "session" is matched alone and in the plural;
# the allow-list holds the technical uses (pytest's session scope), removed before matching.
HISTORY_WORDS = re.compile(r"\bsessions?\b|\bbuild machines?\b|\blent\b", re.IGNORECASE)
TECHNICAL_USES = re.compile(r'scope="session"|pytest session|session-scoped', re.IGNORECASE)

_md = MarkdownIt("commonmark").enable("table")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def github_slug(text: str) -> str:
    """GitHub's heading anchor: lower case, punctuation other than '-' and '_' dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@cache
def tokens(path: Path) -> list:
    return _md.parse(path.read_text(encoding="utf-8"))


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every heading anchor of a markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    toks = tokens(path)
    for i, tok in enumerate(toks):
        if tok.type != "heading_open":
            continue
        text = "".join(c.content for c in toks[i + 1].children if c.type in ("text", "code_inline"))
        slug = github_slug(text)
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return frozenset(found)


def links(path: Path) -> list[str]:
    out = []
    for tok in tokens(path):
        for child in tok.children or []:
            if child.type == "link_open":
                out.append(child.attrGet("href"))
            elif child.type == "image":
                out.append(child.attrGet("src"))
    return out


def test_github_slug_matches_githubs_anchors():
    assert github_slug("Serve on the H100 node (2026-11-26)") == "serve-on-the-h100-node-2026-11-26"
    assert github_slug("CPU: AMD EPYC, 2 cores, AVX-512 with avx512_bf16") == "cpu-amd-epyc-2-cores-avx-512-with-avx512_bf16"
    assert github_slug("The library: gemma/") == "the-library-gemma"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=rel)
def test_every_relative_link_resolves(doc: Path):
    assert doc.exists(), f"{rel(doc)} is missing"
    broken = []
    for href in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", href, re.IGNORECASE) or href.startswith("//"):
            continue  # http(s), mailto: not this repository's
        path, _, fragment = href.partition("#")
        target = (doc.parent / unquote(path)).resolve() if path else doc
        if not target.is_relative_to(ROOT) or not target.exists():
            broken.append(f"{href}: no such file in the repository")
        elif fragment and target.suffix == ".md" and fragment not in anchors(target):
            broken.append(f"{href}: {rel(target)} has no heading with anchor #{fragment}")
        elif fragment and target.suffix != ".md" and not re.fullmatch(r"L\d+(-L\d+)?", fragment):
            broken.append(f"{href}: only a line anchor (#L10) can point into {rel(target)}")
    assert not broken, f"{rel(doc)}:\n" + "\n".join(broken)


def layout_entries() -> list[str]:
    """The paths the README's "Layout" section names, from its code block: a line at column 0 names a path from the
    repository root (a folder ends in '/'); an indented line names a path inside the last such folder."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert section, 'README.md has no "## Layout" section'
    block = re.search(r"^```[^\n]*\n(.*?)^```", section.group(1), re.MULTILINE | re.DOTALL)
    assert block, "README.md's Layout section has no code block"
    entries, folder = [], None
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        name = line.split()[0]
        if not line[0].isspace():
            entries.append(name)
            folder = name if name.endswith("/") else None
        else:
            assert folder, f"layout line {line.strip()!r} is indented under no folder"
            entries.append(folder + name)
    return entries


def test_layout_lists_every_module():
    """Every .py file of gemma/ and deployments/ (subfolders included) is named by its path; __init__.py files
    are exempt (their package's folder stands for them), and may be listed."""
    listed = set(layout_entries())
    modules = {
        rel(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }
    missing = sorted(modules - listed)
    assert not missing, "README.md's Layout section does not list: " + ", ".join(missing)


def test_layout_names_only_what_exists():
    entries = layout_entries()
    assert len(entries) == len(set(entries)), "README.md's Layout section lists a path twice"
    absent = [e for e in entries if not (list(ROOT.glob(e)) if "*" in e else (ROOT / e).exists())]
    assert not absent, "README.md's Layout section names paths that do not exist: " + ", ".join(absent)


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=rel)
def test_documents_describe_the_software_not_its_history(doc: Path):
    found = [
        f"{rel(doc)}:{n}: {m.group(0)!r} in {line.strip()[:100]!r}"
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
        for m in HISTORY_WORDS.finditer(TECHNICAL_USES.sub("", line))
    ]
    assert not found, "history words (give a figure a date, the hardware and the command instead):\n" + "\n".join(found)
