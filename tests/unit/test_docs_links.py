"""Every link in the repository's Markdown resolves: relative paths to files or directories that exist,
and `#fragments` to a heading (GitHub's slug) or an HTML anchor of the page they point into.

Offline and fast: web links (http, https, mailto) are not fetched. Links inside fenced code blocks and
inline code are not links. The README also stays short (the details live under docs/).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 280

# Directories never walked when git cannot list the files (virtualenvs, caches, test output).
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "test-output", ".gpu", "gpu-check-out", "bench-results",
             ".pytest_cache", ".ruff_cache", ".hypothesis", ".cache", "build", "dist", "__pycache__"}

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target): text may hold one level of brackets; target may be <...>, then a title.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]\\]|\\.|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+[^>]*(?:id|name)=[\"']([^\"']+)[\"']", re.IGNORECASE)
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)  # http:, https:, mailto:, ...


def markdown_files(root: Path = ROOT) -> list[Path]:
    """The repository's Markdown: tracked files plus untracked ones git does not ignore (new docs before
    their commit); without git, a walk that skips virtualenvs, caches and test output."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.md"],
                             cwd=root, capture_output=True, check=True, timeout=30).stdout.decode()
        files = {root / name for name in out.split("\0") if name}
    except (OSError, subprocess.SubprocessError):
        files = {p for p in root.rglob("*.md")
                 if not any(part in SKIP_DIRS or part.endswith(".egg-info") for part in p.relative_to(root).parts)}
    return sorted(p for p in files if p.is_file())


def _outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks (``` or ~~~)."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
            else:
                lines.append((number, line))
        elif match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                and not line.strip()[len(match.group(1)):].strip():
            fence = None  # a closing fence: the same character, at least as long, nothing after it
    return lines


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """Lines outside fenced code blocks, with inline code blanked out (same length, so no link survives)."""
    return [(number, CODE_SPAN.sub(lambda m: "x" * len(m.group(0)), line)) for number, line in _outside_fences(text)]


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition in prose."""
    found = []
    for number, line in _prose_lines(text):
        targets = [m.group(1) for m in INLINE_LINK.finditer(line)]
        definition = REFERENCE_DEF.match(line)
        if definition:
            targets.append(definition.group(1))
        found += [(number, t[1:-1] if t.startswith("<") and t.endswith(">") else t) for t in targets]
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = re.sub(r"[^\w\- ]", "", text.lower())  # keeps letters, digits, _, - and spaces
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The fragments a page answers to: its headings' slugs (repeats get -1, -2, ...) and HTML anchors."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in _outside_fences(text):
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
        result.update(HTML_ANCHOR.findall(line))
    return result


def broken_links(files: list[Path], root: Path = ROOT) -> list[str]:
    """`file:line: target (why)` for every link that does not resolve."""
    problems = []
    anchor_cache: dict[Path, set[str]] = {}

    def page_anchors(page: Path) -> set[str]:
        if page not in anchor_cache:
            anchor_cache[page] = anchors(page.read_text(encoding="utf-8"))
        return anchor_cache[page]

    for md in files:
        where = md.relative_to(root)
        for number, target in links(md.read_text(encoding="utf-8")):
            if EXTERNAL.match(target):
                continue
            path_part, _, fragment = target.partition("#")
            path_part = unquote(path_part.split("?", 1)[0])
            dest = (md.parent / path_part).resolve() if path_part else md
            if path_part and not dest.exists():
                problems.append(f"{where}:{number}: {target} (no such file or directory)")
                continue
            if fragment and dest.is_file() and dest.suffix.lower() == ".md":
                if unquote(fragment).lower() not in page_anchors(dest):
                    problems.append(f"{where}:{number}: {target} (no heading #{fragment} in {dest.name})")
    return problems


# A repository path written as inline code (`worker/engine.py`, `tests/unit/test_engine.py::test_x`, `deploy/k8s/`):
# templates such as `bench/results/<date>.json` or `worker/models/<family>.py` are left alone.
CODE_PATH = re.compile(r"^(?:api|bench|common|deploy|docs|scripts|tests|worker)/[\w./-]*(?:::[\w\[\]-]+)?$")


def named_paths(text: str) -> list[tuple[int, str]]:
    """(line number, path) of every repository path written as inline code in prose."""
    found = []
    for number, line in _outside_fences(text):
        for match in CODE_SPAN.finditer(line):
            code = match.group(2).strip()
            if CODE_PATH.match(code):
                found.append((number, code.split("::", 1)[0]))
    return found


def missing_paths(files: list[Path], root: Path = ROOT) -> list[str]:
    """`file:line: path` for every repository path named in inline code that does not exist."""
    return [f"{md.relative_to(root)}:{number}: {path}"
            for md in files for number, path in named_paths(md.read_text(encoding="utf-8"))
            if not (root / path).exists()]


def test_every_markdown_link_resolves():
    files = markdown_files()
    assert ROOT / "README.md" in files
    problems = broken_links(files)
    assert not problems, f"{len(problems)} broken Markdown link(s):\n" + "\n".join(problems)


def test_every_file_the_docs_name_exists():
    """The file maps and references stay true when code moves: `api/service.py` in a page is a file."""
    problems = missing_paths(markdown_files())
    assert not problems, f"{len(problems)} path(s) named in Markdown do not exist:\n" + "\n".join(problems)


def test_the_readme_stays_short():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}: move details to docs/)"


def test_the_checker_finds_what_is_broken(tmp_path):
    """The check itself: broken paths and fragments are reported with file:line; code, web links and good
    links are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Errors: the `/v1` routes\n", encoding="utf-8")
    (tmp_path / "README.md").write_text("\n".join([
        "# Title",
        "[good](docs/page.md) [good anchor](docs/page.md#errors-the-v1-routes) [self](#title)",
        "[missing](docs/nope.md) ![missing image](img/none.png)",
        "[bad anchor](docs/page.md#nothing-here) [web](https://example.com/x) <https://example.com>",
        "`[in code](nowhere.md)`",
        "```",
        "[in a fence](nowhere.md)",
        "```",
        "[ref]: docs/gone.md",
    ]), encoding="utf-8")
    problems = broken_links([tmp_path / "README.md", tmp_path / "docs" / "page.md"], root=tmp_path)
    assert problems == [
        "README.md:3: docs/nope.md (no such file or directory)",
        "README.md:3: img/none.png (no such file or directory)",
        "README.md:4: docs/page.md#nothing-here (no heading #nothing-here in page.md)",
        "README.md:9: docs/gone.md (no such file or directory)",
    ]
