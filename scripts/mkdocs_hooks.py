"""MkDocs hooks (mkdocs.yml `hooks:`): links from docs/ to files of the repository outside it.

A page links to `../ENVs.md` or `../benchmarks/results/frontier/` relative to its own file, so
the link works on GitHub. MkDocs knows only the files under docs/ and would report such a link
as broken; here each one is checked against the checkout instead (a link that names no file of
the repository, or an anchor no heading of that Markdown file has, is a warning, so
`mkdocs build --strict` fails on it) and, in the built site,
points to that file: in the repository at `repo_url` when mkdocs.yml sets one
(`<repo_url>/blob/HEAD/<path>`, `tree` for a folder), else in the checkout the site was built
from (a relative path from the page's HTML file). Nothing is copied into the site.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.repo_links")

# an inline Markdown link or image target: [text](target) / ![alt](target)
LINK = re.compile(r"(\]\()([^)\s]+)(\))")
FENCE = re.compile(r"^\s*(```|~~~)")
# the placeholder a checked link carries from markdown to HTML; its scheme keeps MkDocs's own
# link validation away from it
SCHEME = "d3fast-repo:"
HREF = re.compile(r'(href|src)="' + re.escape(SCHEME) + r'([^"#]*)(#[^"]*)?"')


def github_slugs(text: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped,
    spaces as hyphens, a repeated heading numbered (-1, -2, ...)."""
    slugs: set[str] = set()
    fenced = False
    for line in text.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            slug, n = base, 0
            while slug in slugs:
                n += 1
                slug = f"{base}-{n}"
            slugs.add(slug)
    return slugs


def _root(config: Any) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs = Path(config.docs_dir).resolve()
    root = _root(config)
    page_dir = Path(page.file.abs_src_path).resolve().parent

    def swap(m: re.Match[str]) -> str:
        target = m.group(2)
        path, _, anchor = target.partition("#")
        # external (a scheme), absolute, or a link within the page: MkDocs's own checks apply
        if not path or re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", path) or path.startswith("/"):
            return m.group(0)
        where = Path(os.path.normpath(page_dir / path))
        if where == docs or docs in where.parents:
            return m.group(0)
        if root not in where.parents or not where.exists():
            log.warning(f"Doc file '{page.file.src_uri}' contains a link '{target}', which names no file "
                        "of the repository")
            return m.group(0)
        if anchor and where.suffix == ".md" and anchor not in github_slugs(where.read_text()):
            log.warning(f"Doc file '{page.file.src_uri}' contains a link '{target}', but {where.relative_to(root)} "
                        f"has no heading with the anchor '#{anchor}'")
        rel = where.relative_to(root).as_posix() + ("/" if where.is_dir() else "")
        return f"{m.group(1)}{SCHEME}{rel}{'#' + anchor if anchor else ''}{m.group(3)}"

    out, fenced = [], False
    for line in markdown.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
        out.append(line if fenced else LINK.sub(swap, line))
    return "\n".join(out)


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    root = _root(config)
    repo = (config.repo_url or "").rstrip("/")
    # the page's HTML file: <site>/<url>index.html with directory URLs, else <site>/<url>
    here = Path(config.site_dir).resolve() / page.url
    here = here if page.url.endswith("/") or not page.url else here.parent

    def swap(m: re.Match[str]) -> str:
        rel, anchor = m.group(2), m.group(3) or ""
        if repo:
            url = f"{repo}/{'tree' if rel.endswith('/') else 'blob'}/HEAD/{rel.rstrip('/')}"
        else:
            url = Path(os.path.relpath(root / rel, here)).as_posix() + ("/" if rel.endswith("/") else "")
        return f'{m.group(1)}="{url}{anchor}"'

    return HREF.sub(swap, html)
