"""The commands and files the docs show exist: every `--flag` of an `mmgen ...` or
`bench/*.py` command written in README.md, docs/, config docstrings, script headers and
bench docstrings is an option of that command's parser (exact strings: argparse would
also take a prefix, which hides a renamed flag), and every repository path they name is
in the repository. No parser runs a command: cli.py and launch.py import only the
standard library at module level, and bench scripts are read with `ast`."""

import argparse
import ast
import re

import pytest

from mmgen import cli, launch

_COMMAND = re.compile(r"\b(mmgen(?: [a-z][\w-]*){1,2}|bench/\w+\.py)([^`|;\n]*)")
_FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")
_PATH = re.compile(r"(?<![\w./-])((?:configs|scripts|bench|docs|tests|mmgen)/[\w/.-]*"
                   r"\.(?:py|sh|md|tmpl|png|json))(?!\.?\w)")
_PLACEHOLDER = re.compile(r"(?:^|/)[A-Z][A-Z_]+\.")  # configs/NAME.py


def _subparsers(p: argparse.ArgumentParser) -> dict:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


def _bench_options(path) -> set[str]:
    out = {"-h", "--help"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            negatable = any("BooleanOptional" in ast.unparse(k.value) for k in node.keywords)
            for arg in node.args:
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("--"):
                    out.add(arg.value)
                    if negatable:
                        out.add("--no-" + arg.value[2:])
    return out


def _known_commands(repo) -> dict[str, set[str]]:
    """'mmgen VERB' and 'mmgen VERB SUB' (data, launch) -> option strings; 'bench/X.py' too.
    A verb with subcommands also takes their options, for text like `mmgen launch TARGET
    --config ...`."""
    known = {}
    for verb, p in _subparsers(cli.build_parser()).items():
        known[f"mmgen {verb}"] = _options(p)
        subs = _subparsers(launch.build_parser()) if verb == "launch" else _subparsers(p)
        for name, sp in subs.items():
            known[f"mmgen {verb} {name}"] = _options(sp)
            known[f"mmgen {verb}"] |= _options(sp)
    for path in (repo / "bench").glob("*.py"):
        known[f"bench/{path.name}"] = _bench_options(path)
    return known


def _join_continued(text: str) -> str:
    """A command continued over lines (`\\` then the next line, also inside comments)."""
    return re.sub(r"\\\n[ \t]*(?:#[ \t]*)?", " ", text)


def _doc_texts(repo):
    for pattern in ("README.md", "docs/*.md", "configs/*.py", "scripts/*.sh", "bench/*.py"):
        for path in sorted(repo.glob(pattern)):
            yield path, _join_continued(path.read_text())


def _unknown_flags(text: str, known: dict[str, set[str]]) -> list[str]:
    bad = []
    for m in _COMMAND.finditer(text):
        words = m.group(1).split()
        # the longest known command: `mmgen data prepare`, else `mmgen data`
        name = next((" ".join(words[:n]) for n in (3, 2, 1) if " ".join(words[:n]) in known),
                    None)
        if name is None:
            continue
        rest = " ".join(words[len(name.split()):]) + m.group(2)
        bad += [f"{name} {flag}" for flag in _FLAG.findall(rest)
                if not flag.startswith(("--config.", "--xla")) and flag not in known[name]]
    return bad


def test_doc_commands_use_existing_flags(repo):
    known = _known_commands(repo)
    assert {"mmgen train", "mmgen data tokenizer", "mmgen launch slurm",
            "bench/decode.py"} <= set(known)
    bad, commands = [], 0
    for path, text in _doc_texts(repo):
        commands += len(_COMMAND.findall(text))
        bad += [f"{path.relative_to(repo)}: {b}" for b in _unknown_flags(text, known)]
    assert commands > 100  # the scan finds the docs' commands at all
    assert not bad, "flags the docs use that the command does not have: " + "; ".join(bad)


def _missing_paths(repo, doc, text: str) -> tuple[list[str], int]:
    names = [n for n in set(_PATH.findall(text)) if not _PLACEHOLDER.search(n)]
    missing = [n for n in names
               if not any((base / n).exists() for base in (repo, repo / "mmgen", doc.parent))]
    return missing, len(names)


def test_doc_paths_exist(repo):
    missing, checked = [], 0
    for path, text in _doc_texts(repo):
        names, n = _missing_paths(repo, path, text)
        missing += [f"{path.relative_to(repo)}: {name}" for name in names]
        checked += n
    assert checked > 100
    assert not missing, "paths the docs name that are not in the repository: " + "; ".join(
        sorted(missing))


def test_the_path_check_finds_a_missing_file(repo):
    text = ("see docs/no_such_page.md. The launcher is mmgen/launch_templates/tpu_vm.sh.tmpl; "
            "train with `configs/NAME.py` or configs/tiny.py")
    assert _missing_paths(repo, repo / "README.md", text) == (["docs/no_such_page.md"], 3)


@pytest.mark.parametrize("text, expected", [
    ("`mmgen data tokenizer --src a --out b --vocab 32000`", ["mmgen data tokenizer --vocab"]),
    ("mmgen launch tpu-vm --config c.py \\\n    --tpu v5p-128", ["mmgen launch tpu-vm --tpu"]),
    ("python bench/decode.py --gpu-1b --no-such-flag", ["bench/decode.py --no-such-flag"]),
    ("mmgen eval --checkpoint R --suite scenes --out D", []),
])
def test_the_flag_check_finds_made_up_flags(repo, text, expected):
    """The scan above reports a prefix or made-up flag, over continued lines too."""
    assert _unknown_flags(_join_continued(text), _known_commands(repo)) == expected
