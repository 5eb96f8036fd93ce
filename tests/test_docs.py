"""The documentation holds: the site builds in strict mode, and every command block of
README.md and docs/*.md runs as written or says why it cannot run here.

A `bash` block is `d3fast` commands, one a line (`# comments`, `\\` continuations and
`> FILE` allowed); a `console` block is `$ d3fast ...` lines, each followed by lines of its
output that must appear in that order (`...` stands for any text; an `error:` line means the
command fails with exit status 2); a `python` block is executed. Each runs in a fresh
D3FAST_HOME holding digits and two tiny experts, on tiny settings: the digits preset is
replaced by the tests' tiny one (tests/_utils.py OVERRIDES, 1 student x 1 epoch), and the
flags a block gives still apply. A block that cannot run here carries, on the line above its
fence, `<!-- skip: why -->`, or `<!-- tested: tests/FILE.py -->` where that test runs it and
checks its results (docs/development.md, "This documentation").

The site build and the executed blocks run once (slow: scripts/test.sh's first pass); the
checks on the text run in both passes.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tests._utils import OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND_LANGS = {"bash", "sh", "shell", "console", "python", "py"}
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`{]*)")
MARKER = re.compile(r"^\s*<!--\s*(\w+)\s*:?\s*(.*?)\s*-->\s*$")
# the tiny settings every executed block runs on, over the digits preset
TINY = [*OVERRIDES, "eval.students=1", "eval.epochs=1", "eval.samples_per_class=2"]


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marker: tuple[str, str] | None  # ("skip", why) or ("tested", test file)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, with the marker comment on the line above it."""
    lines = path.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, start = m.group(2), i
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        above = MARKER.match(lines[start - 1]) if start else None
        indent = len(m.group(1))
        body = "\n".join(line[indent:] for line in lines[start + 1:i])
        blocks.append(Block(path, start + 1, m.group(3).lower(), body, above.groups() if above else None))
        i += 1
    return blocks


BLOCKS = [b for page in PAGES for b in fenced_blocks(page)]
COMMANDS = [b for b in BLOCKS if b.lang in COMMAND_LANGS]


def commands_of(block: Block) -> list[tuple[list[str], str | None, list[str]]]:
    """A bash or console block as (d3fast arguments, file its stdout goes to, output lines
    expected) per command.

    Raises:
        ValueError: why the block cannot run here."""
    steps: list[tuple[list[str], str | None, list[str]]] = []
    lines = block.text.split("\n")
    k = 0
    while k < len(lines):
        line, k = lines[k], k + 1
        if block.lang == "console":
            if not line.startswith("$ "):
                if not steps:
                    raise ValueError(f"line {k}: output before any `$ ` command")
                if line.strip():
                    steps[-1][2].append(line.strip())
                continue
            line = line[2:]
        while line.rstrip().endswith("\\") and k < len(lines):
            line, k = line.rstrip()[:-1] + " " + lines[k], k + 1
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise ValueError(f"line {k}: {e}") from None
        if not words:
            continue
        if words[0] != "d3fast":
            raise ValueError(f"line {k}: only d3fast commands run here, not {words[0]!r}")
        shell = [w for w in words if w in ("|", "||", "&&", ";", "&", "<", ">>", "2>") or w.startswith(("$", "["))]
        if shell:
            raise ValueError(f"line {k}: {shell[0]!r} needs a shell or stands for something to fill in")
        out = None
        if ">" in words:
            at = words.index(">")
            if at != len(words) - 2:
                raise ValueError(f"line {k}: `> FILE` must end the command")
            words, out = words[:at], words[at + 1]
        steps.append((words[1:], out, []))
    if not steps:
        raise ValueError("no command in it")
    return steps


def test_every_command_block_runs_here_or_says_why_not():
    """Each bash/console/python block is one the runner takes, or carries a skip/tested
    marker with its reason; every fence names its language, so none escapes this check."""
    problems = []
    for b in BLOCKS:
        if not b.lang:
            problems.append(f"{b.where}: a fenced block without a language (bash, console, python, text, ...)")
            continue
        if b.lang not in COMMAND_LANGS:
            continue
        if b.marker:
            kind, why = b.marker
            if kind == "skip" and not why:
                problems.append(f"{b.where}: `<!-- skip: why -->` needs its reason")
            elif kind == "tested":
                test = ROOT / why
                rel = b.path.relative_to(ROOT).as_posix()
                if not (why.startswith("tests/") and test.is_file() and rel in test.read_text()):
                    problems.append(f"{b.where}: `<!-- tested: {why} -->` names no test file that reads {rel}")
            elif kind not in ("skip", "tested"):
                problems.append(f"{b.where}: unknown marker {kind!r} (skip: why, or tested: tests/FILE.py)")
            continue
        if b.lang in ("python", "py"):
            try:
                compile(b.text, b.where, "exec")
            except SyntaxError as e:
                problems.append(f"{b.where}: {e}")
            continue
        try:
            commands_of(b)
        except ValueError as e:
            problems.append(f"{b.where}: cannot run here ({e}); make it runnable, or mark it "
                            "`<!-- skip: why -->` on the line above its fence")
    assert not problems, "\n".join(problems)


def test_the_readme_test_command_is_ci():
    """The README's second set-up command is what CI runs (.ci/run), and the first is the demo."""
    quick = next(b for b in BLOCKS if b.path.name == "README.md" and "scripts/test.sh" in b.text)
    commands = [words for line in quick.text.split("\n") if (words := shlex.split(line, comments=True))]
    assert commands == [["bash", "scripts/demo.sh"], ["bash", "scripts/test.sh"]], quick.where
    ci = [line for line in (ROOT / ".ci" / "run").read_text().split("\n") if line.strip() and not line.startswith("#")]
    assert shlex.split(ci[-1]) == ["bash", "scripts/test.sh"], ".ci/run no longer runs the README's test command"
    assert "d3fast distill --dataset digits --evaluate" in (ROOT / "scripts" / "demo.sh").read_text()


def test_readme_links_name_files_and_headings():
    """README.md is not part of the site: its relative links are checked here, anchors against
    the headings GitHub makes of the target (scripts/mkdocs_hooks.py's rule)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from mkdocs_hooks import LINK, github_slugs
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    readme = ROOT / "README.md"
    problems = []
    for target in LINK.findall(readme.read_text()):
        path, _, anchor = target[1].partition("#")
        if re.match(r"[a-z]+:", path):
            continue
        where = (ROOT / path) if path else readme
        if not where.exists():
            problems.append(f"README.md links to {target[1]}: no such file")
        elif anchor and anchor not in github_slugs(where.read_text()):
            problems.append(f"README.md links to {target[1]}: no heading with that anchor")
    assert not problems, "\n".join(problems)


def test_readme_fits_a_few_screens():
    assert len((ROOT / "README.md").read_text().split("\n")) <= 150, "the reference goes into docs/"


def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=config.parent, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_site_builds_in_strict_mode(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page missing from the nav, a
    docstring mkdocstrings cannot read fails it (mkdocs.yml `validation`)."""
    out = _mkdocs(ROOT / "mkdocs.yml", tmp_path / "site")
    assert out.returncode == 0, f"mkdocs build --strict failed (pip install -e '.[dev]' installs mkdocs):\n{out.stdout}{out.stderr}"
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    for name in ("d3fast.api.distill", "d3fast.api.evaluate", "d3fast.api.load", "d3fast.distilled.Distilled.sample"):
        assert f'id="{name}"' in reference, f"the API reference lacks {name}"
    # a link to a file outside docs/ points to that file (from the page's HTML, in this checkout)
    costs = tmp_path / "site" / "costs" / "index.html"
    hrefs = re.findall(r'href="([^"]*benchmarks/README\.md)"', costs.read_text())
    assert hrefs and all((costs.parent / h).resolve() == ROOT / "benchmarks" / "README.md" for h in hrefs), hrefs


@pytest.mark.slow
def test_strict_build_names_each_broken_link(tmp_path):
    """With mkdocs.yml's validation and hook, each kind of mistake fails the build, named."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text(
        "# Home\n\n[a](missing.md) [b](other.md#no-such-heading) [c](../no-such-file.md) [d](../README.md#nowhere)\n"
        "[e](../README.md#home)\n")
    (tmp_path / "docs" / "other.md").write_text("# Other\n")
    (tmp_path / "docs" / "orphan.md").write_text("# Orphan\n")
    (tmp_path / "README.md").write_text("# Home\n")
    small = {"site_name": "t", "nav": ["index.md", "other.md"], "validation": config["validation"],
             "hooks": [str(ROOT / h) for h in config["hooks"]], "markdown_extensions": config["markdown_extensions"]}
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(small))
    out = _mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site")
    log = out.stdout + out.stderr
    assert out.returncode != 0, log
    for text in ("'missing.md'", "no-such-heading", "no-such-file.md", "'#nowhere'", "orphan.md"):
        assert text in log, (text, log)
    assert "#home" not in log, log


@pytest.fixture
def doc_home(d3fast_home, shared_home, tmp_path, monkeypatch):
    """A fresh home holding the shared digits cache and tiny experts, the digits preset made
    tiny, and an empty working directory."""
    import d3fast.config as config

    shutil.copytree(shared_home, d3fast_home, dirs_exist_ok=True)
    shutil.rmtree(d3fast_home / "runs", ignore_errors=True)
    tiny_cfg = config.resolve_config("digits", overrides=TINY)
    original = config.load_preset
    tiny = copy.deepcopy(original("digits"))
    for item in TINY:
        *sections, leaf = item.split("=", 1)[0].split(".")
        node, value = tiny, tiny_cfg
        for s in sections:
            node, value = node.setdefault(s, {}), getattr(value, s)
        node[leaf] = getattr(value, leaf)
    monkeypatch.setattr(config, "load_preset", lambda name: copy.deepcopy(tiny) if name == "digits" else original(name))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return d3fast_home


def _matches(expected: list[str], output: str) -> bool:
    """Each expected line matches a line of the output, in order (`...`: any text)."""
    got = iter(line.strip() for line in output.split("\n"))
    patterns = [re.compile(".*".join(re.escape(part) for part in line.split("..."))) for line in expected]
    return all(any(p.fullmatch(line) for line in got) for p in patterns)


RUNNABLE = [b for b in COMMANDS if b.marker is None]


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_command_block_runs(block, doc_home):
    from d3fast.cli import cli

    if block.lang in ("python", "py"):
        exec(compile(block.text, block.where, "exec"), {"__name__": "__doc_block__"})
        return
    for args, out, expected in commands_of(block):
        shown = "d3fast " + shlex.join(args)
        r = CliRunner().invoke(cli, args)
        detail = "".join(traceback.format_exception(r.exception)) if r.exception and r.exit_code not in (0, 2) else ""
        want = 2 if any(line.startswith("error:") for line in expected) else 0
        assert r.exit_code == want, (f"{block.where}: `{shown}` exited {r.exit_code}, not {want} (a block that cannot run "
                                     f"here is marked `<!-- skip: why -->` above its fence):\n{r.output}{detail}")
        assert _matches(expected, r.output), f"{block.where}: `{shown}` printed\n{r.output}\nnot\n" + "\n".join(expected)
        if out:
            Path(out).write_text(r.stdout)
