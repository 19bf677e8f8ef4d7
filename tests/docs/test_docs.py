"""README.md and docs/*.md stay true to the tree and to the command lines.

* Every relative link resolves: its file exists, and its `#anchor` is a heading of the
  target page (GitHub's slugs).
* Every `adapterhub-server` and `trainer` flag the pages name exists in the real parsers.
  A flag belongs to one of these CLIs when it follows an invocation of it in a code block
  or code span (`adapterhub-server registry push ... --name x`, `python -m trainer train
  --lr 1e-3`, `make serve ARGS="--port 8124"`; checked against that subcommand's parser),
  when it sits in a table column headed `flag` (the configuration table, limits.md,
  memory.md, ray.md; adapterhub-server's flags), or when a code span starts with it
  (`--max-loras`, `--registry postgresql://...`; either CLI's flags) outside the pages in
  `BARE_FLAG_EXEMPT`. Flags of other tools (pip, torchrun, docker, ray, kubectl, curl, the
  benchmark scripts, a column headed `EPP flag`) are not checked.
* Every `serve` flag has a row in the configuration table of docs/serving.md.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CONFIG_PAGE = REPO / "docs" / "serving.md"

FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
CODE_SPAN = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
LINK_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
LINE_ANCHOR = re.compile(r"^L\d+(-L\d+)?$")
FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")
BARE_FLAG_EXEMPT = {
    "benchmarks.md": "its bare flags are the benchmark scripts' (`--smoke`, `--seqs 64`)",
    "models.md": "its speed section quotes bench/serve_throughput.py's `--skip` and `--repeats`",
}
"""Pages whose code spans that start with a flag are not taken as the CLIs' flags."""
SHELL_FENCES = {"", "bash", "sh", "shell", "console", "text"}
"""Fenced blocks searched for command lines; python, json and yaml blocks hold none."""
COMMAND_END = {"|", "||", "&&", ";", "&", ">", ">>", "2>&1"}
MAKE_SERVE = re.compile(r"\bmake serve ARGS=([\"'])(.*?)\1")


# --- Markdown -----------------------------------------------------------------------------


@dataclass
class Page:
    path: Path
    prose: str
    """The text outside fenced code blocks."""
    fences: list[tuple[str, str]] = field(default_factory=list)
    """(info string, body) of every fenced code block."""


def read_page(path: Path) -> Page:
    return parse_page(path, path.read_text(encoding="utf-8"))


def parse_page(path: Path, text: str) -> Page:
    prose: list[str] = []
    page = Page(path, "")
    fence: str | None = None
    info, body = "", []
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence, info, body = match.group(1), match.group(2).lower(), []
            prose.append("")
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)):
            page.fences.append((info, "\n".join(body)))
            fence = None
            prose.append("")
        elif fence is not None:
            body.append(line)
            prose.append("")
        else:
            prose.append(line)
    page.prose = "\n".join(prose)
    return page


def code_spans(prose: str) -> Iterator[str]:
    """Inline code spans, each with its line breaks turned into spaces."""
    for paragraph in re.split(r"\n\s*\n", prose):
        for match in CODE_SPAN.finditer(paragraph):
            yield " ".join(match.group(2).split())


def without_code_spans(prose: str) -> str:
    return "\n\n".join(CODE_SPAN.sub("", p) for p in re.split(r"\n\s*\n", prose))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lowercased, punctuation but `-` and `_`
    dropped, spaces as `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Page) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in page.prose.splitlines():
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    found.update(HTML_ANCHOR.findall(page.prose))
    return found


def links(page: Page) -> list[str]:
    text = without_code_spans(page.prose)
    return LINK.findall(text) + LINK_DEFINITION.findall(text)


def tables(prose: str) -> Iterator[list[list[str]]]:
    """Each markdown table as rows of cells (the header first, the `---` row dropped)."""
    rows: list[list[str]] = []
    for line in [*prose.splitlines(), ""]:
        if line.lstrip().startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
            if not all(re.fullmatch(r"\s*:?-+:?\s*", c) for c in cells):
                rows.append([c.strip() for c in cells])
        elif rows:
            yield rows
            rows = []


def flag_column_cells(page: Page) -> Iterator[str]:
    """The cells of every table column headed `flag`."""
    for table in tables(page.prose):
        header, body = table[0], table[1:]
        columns = [i for i, name in enumerate(header) if name.lower() == "flag"]
        for row in body:
            yield from (row[i] for i in columns if i < len(row))


# --- Command lines ------------------------------------------------------------------------


@dataclass
class Cli:
    """One parser of a command line and its subcommands."""

    options: set[str]
    children: dict[str, Cli]

    @classmethod
    def of(cls, parser: argparse.ArgumentParser) -> Cli:
        options: set[str] = set()
        children: dict[str, Cli] = {}
        # argparse exposes subcommands only through its private _actions list.
        for action in parser._actions:
            options.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                children.update({name: cls.of(p) for name, p in action.choices.items()})
        return cls(options, children)

    def all_options(self) -> set[str]:
        return self.options.union(*(c.all_options() for c in self.children.values()))


@pytest.fixture(scope="module")
def clis() -> dict[str, Cli]:
    from adapterhub_server.cli import build_parser as server_parser
    from trainer.cli import build_parser as trainer_parser

    return {"adapterhub-server": Cli.of(server_parser()), "trainer": Cli.of(trainer_parser())}


def program(tokens: list[str], i: int) -> str | None:
    """The CLI that `tokens[i]` invokes, if any: `adapterhub-server`, `trainer` (any path
    before them), or `-m adapterhub_server` / `-m trainer`."""
    name = tokens[i].rsplit("/", 1)[-1]
    if name in ("adapterhub-server", "trainer"):
        return name
    if name == "adapterhub_server" and i > 0 and tokens[i - 1] == "-m":
        return "adapterhub-server"
    return None


def flags_in_command(line: str, clis: dict[str, Cli]) -> Iterator[str]:
    """A problem for every flag after an invocation on `line` that its parser lacks."""
    line = MAKE_SERVE.sub(lambda m: f"adapterhub-server serve {m.group(2)}", line)
    tokens = line.split()
    for i in range(len(tokens)):
        name = program(tokens, i)
        if name is None:
            continue
        node, path, allowed = clis[name], [name], set(clis[name].options)
        j = i + 1
        while j < len(tokens) and tokens[j] in node.children:
            node = node.children[tokens[j]]
            path.append(tokens[j])
            allowed |= node.options
            j += 1
        if node.children:  # no subcommand named: any of them may be meant
            allowed |= node.all_options()
        for token in tokens[j:]:
            if token in COMMAND_END or token.startswith("#"):
                break
            for flag in FLAG.findall(token):
                if flag not in allowed:
                    yield f"`{' '.join(path)}` has no {flag}"


def command_lines(page: Page) -> Iterator[str]:
    """Code spans, and the lines of shell-like fenced blocks with `\\` continuations
    joined."""
    yield from code_spans(page.prose)
    for info, body in page.fences:
        if info in SHELL_FENCES:
            yield from re.sub(r"\\\n", " ", body).splitlines()


def bare_flag_spans(page: Page) -> Iterator[str]:
    """Code spans that start with a flag (`--max-loras`, `--registry postgresql://...`),
    outside flag tables: `flag` columns have their own check, and another tool's (a column
    headed `EPP flag`, say) none."""
    if page.path.name in BARE_FLAG_EXEMPT:
        return
    lines = page.prose.splitlines()
    start = None
    for n, line in enumerate([*lines, ""]):
        if line.lstrip().startswith("|"):
            start = n if start is None else start
            continue
        if start is not None:
            header = [c.strip().lower() for c in lines[start].strip().strip("|").split("|")]
            if any(h == "flag" or h.endswith(" flag") for h in header):
                lines[start:n] = [""] * (n - start)
            start = None
    for span in code_spans("\n".join(lines)):
        if FLAG.match(span):
            yield span


def flag_problems(page: Page, clis: dict[str, Cli]) -> list[str]:
    rel = page.path.name if page.path.parent == REPO else page.path.relative_to(REPO)
    problems = [
        f"{rel}: {problem} (in: {line.strip()[:120]})"
        for line in command_lines(page)
        for problem in flags_in_command(line, clis)
    ]
    server_flags = clis["adapterhub-server"].all_options()
    known = server_flags | clis["trainer"].all_options()
    for span in bare_flag_spans(page):
        problems += [
            f"{rel}: {flag} is neither an adapterhub-server nor a trainer flag (in: {span[:80]})"
            for flag in FLAG.findall(span)
            if flag not in known
        ]
    for cell in flag_column_cells(page):
        for span in code_spans(cell):
            problems += [
                f"{rel}: a flag table names {flag}, which adapterhub-server lacks"
                for flag in FLAG.findall(span)
                if flag not in server_flags
            ]
    return problems


# --- Tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path) -> None:
    page = read_page(path)
    broken = []
    for target in links(page):
        if SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif REPO not in (dest, *dest.parents):
            broken.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md":
            if unquote(anchor) not in anchors(read_page(dest)):
                broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
        elif anchor and not LINE_ANCHOR.match(anchor):
            broken.append(f"{target}: #{anchor} is not a line anchor of a non-markdown file")
    assert not broken, f"{path.relative_to(REPO)}: broken links:\n" + "\n".join(broken)


def test_named_flags_exist(clis: dict[str, Cli]) -> None:
    problems = [p for path in PAGES for p in flag_problems(read_page(path), clis)]
    assert not problems, "flags the CLIs do not have:\n" + "\n".join(problems)


def test_every_serve_flag_is_in_the_configuration_table(clis: dict[str, Cli]) -> None:
    documented = {
        flag
        for cell in flag_column_cells(read_page(CONFIG_PAGE))
        for span in code_spans(cell)
        for flag in FLAG.findall(span)
    }
    serve = clis["adapterhub-server"].children["serve"].options - {"-h", "--help"}
    missing = sorted(serve - documented)
    assert not missing, f"serve flags without a row in {CONFIG_PAGE.name}: {missing}"


# --- The checks themselves ----------------------------------------------------------------


def test_slugs_follow_github() -> None:
    assert slug("Fine-tuning jobs (HTTP)") == "fine-tuning-jobs-http"
    assert slug("Metrics, logs and probes") == "metrics-logs-and-probes"
    assert slug("Auth, and the risk of `--admin-loopback-without-key`") == (
        "auth-and-the-risk-of---admin-loopback-without-key"
    )
    page = parse_page(REPO / "x.md", "# A\n## A\ntext\n## A\n```\n# not a heading\n```\n")
    assert anchors(page) == {"a", "a-1", "a-2"}


def test_flag_check_catches_a_wrong_flag(clis: dict[str, Cli]) -> None:
    def problems(text: str) -> list[str]:
        return flag_problems(parse_page(REPO / "x.md", text), clis)

    wrong = {
        "Run `adapterhub-server serve --no-such-flag`.": "`adapterhub-server serve` has no",
        "`trainer train --data d.jsonl\n--max-loras 4`": "`trainer train` has no --max-loras",
        '`make serve ARGS="--port 1 --nope"`': "`adapterhub-server serve` has no --nope",
        "```console\n$ python -m adapterhub_server registry list \\\n  --name x\n```\n": (
            "`adapterhub-server registry list` has no --name"
        ),
        "| what | flag |\n|---|---|\n| x | `--max-loras`, not `--no-such-flag` |\n": (
            "a flag table names --no-such-flag"
        ),
        "Set `--no-such-flag 3` to ...": "--no-such-flag is neither",
    }
    for text, expected in wrong.items():
        found = problems(text)
        assert len(found) == 1 and expected in found[0], (text, found)
    # Other tools' flags, flags before the invocation, and flags after a pipe are not the
    # CLI's; a subcommand left out allows any subcommand's flags.
    fine = (
        "`torchrun --nproc-per-node 2 -m trainer train --lora-r 8`",
        "`python -m bench.load_test --smoke`, `pip install --no-deps x`",
        "`adapterhub-server registry list | grep --count x`",
        "`adapterhub-server registry ... --dst-blobs s3://b`",
        "| EPP flag | x |\n|---|---|\n| `--lora-info-metric` | y |\n",
    )
    for text in fine:
        assert problems(text) == [], text
