"""File specs for data sources: comma lists, bash-style braces and globs, local or remote.

A spec is a comma-separated list of paths. Each may hold brace expressions, expanded like
bash does (`shards/{00000..00099}.tar` keeps the zero padding, `{0..10..2}` steps,
`{a,b}` lists, braces may nest) and then glob patterns (`*`, `?`, `[...]`), expanded with
`etils.epath` so `gs://bucket/x/*.tar` works when gcsfs is installed. Commas inside braces
belong to the brace list, not to the spec list. Backslash escapes are not supported.

All file access in mmgen's data readers goes through `etils.epath.Path`, so the same code
reads local disks and object stores (gs://, s3:// through fsspec).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from etils import epath

_GLOB_CHARS = re.compile(r"[*?\[]")
_INT_RANGE = re.compile(r"^([+-]?\d+)\.\.([+-]?\d+)(?:\.\.([+-]?\d+))?$")
_CHAR_RANGE = re.compile(r"^([a-zA-Z])\.\.([a-zA-Z])(?:\.\.([+-]?\d+))?$")
# Remote existence checks are one request each: run them concurrently.
_EXISTS_THREADS = 16


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Splits on `sep` outside braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _matching_close(text: str, open_at: int) -> int:
    """Index of the "}" closing the "{" at `open_at`, or -1."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _step(raw: str | None) -> int:
    return abs(int(raw)) if raw and int(raw) != 0 else 1


def _range_items(body: str) -> list[str] | None:
    """Items of a `{a..b[..step]}` body, or None if the body is not a range."""
    if m := _INT_RANGE.match(body):
        lo_raw, hi_raw = m.group(1), m.group(2)
        lo, hi, step = int(lo_raw), int(hi_raw), _step(m.group(3))
        # bash pads every item to the widest endpoint when either has a leading zero.
        padded = any(re.match(r"^[+-]?0\d", raw) for raw in (lo_raw, hi_raw))
        width = max(len(lo_raw), len(hi_raw)) if padded else 0
        values = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
        return [f"{v:0{width}d}" for v in values]
    if m := _CHAR_RANGE.match(body):
        lo, hi, step = ord(m.group(1)), ord(m.group(2)), _step(m.group(3))
        values = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
        return [chr(v) for v in values]
    return None


def expand_braces(pattern: str) -> list[str]:
    """All strings of a bash brace pattern, in bash's order (not sorted, not unique).

    A "{...}" that is neither a range nor a list with a top-level comma stays literal, as
    in bash (`a{b}c` -> `a{b}c`).
    """
    search_from = 0
    while (open_at := pattern.find("{", search_from)) >= 0:
        close_at = _matching_close(pattern, open_at)
        if close_at < 0:
            return [pattern]
        body = pattern[open_at + 1:close_at]
        items = _range_items(body)
        if items is None:
            alternatives = _split_top_level(body)
            items = alternatives if len(alternatives) > 1 else None
        if items is None:
            search_from = open_at + 1  # literal brace: look for a later expression
            continue
        head, tail = pattern[:open_at], pattern[close_at + 1:]
        out = []
        for item in items:
            out.extend(expand_braces(head + item + tail))
        return out
    return [pattern]


def _glob(pattern: str) -> list[str]:
    if "**" in pattern:
        raise ValueError(f"recursive '**' globs are not supported: {pattern!r}")
    parts = pattern.split("/")
    first_glob = next(i for i, p in enumerate(parts) if _GLOB_CHARS.search(p))
    base = "/".join(parts[:first_glob])
    rest = "/".join(parts[first_glob:])
    if first_glob == 0:  # relative pattern: glob under "." and drop the "./" again
        return [str(p)[2:] if str(p).startswith("./") else str(p)
                for p in epath.Path(".").glob(rest)]
    return [str(p) for p in epath.Path(base or "/").glob(rest)]


def _missing(paths: list[str]) -> list[str]:
    if len(paths) <= 1:
        return [p for p in paths if not epath.Path(p).exists()]
    with ThreadPoolExecutor(min(_EXISTS_THREADS, len(paths))) as pool:
        found = list(pool.map(lambda p: epath.Path(p).exists(), paths))
    return [p for p, ok in zip(paths, found, strict=True) if not ok]


def expand(spec: str) -> list[str]:
    """Sorted, unique paths of a spec (see the module docstring).

    Raises FileNotFoundError if a glob matches nothing or a plain path does not exist.
    """
    if not spec or not spec.strip():
        raise FileNotFoundError("empty file spec")
    found: set[str] = set()
    literal: list[str] = []
    for part in _split_top_level(spec):
        part = part.strip()
        if not part:
            continue
        for path in expand_braces(part):
            if _GLOB_CHARS.search(path):
                matches = _glob(path)
                if not matches:
                    raise FileNotFoundError(f"no files match {path!r} (spec {spec!r})")
                found.update(matches)
            else:
                literal.append(path)
    missing = _missing(sorted(set(literal)))
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} path(s) of spec {spec!r} do not exist: {shown}")
    found.update(literal)
    if not found:
        raise FileNotFoundError(f"no files match spec {spec!r}")
    return sorted(found)
