"""Every key of every shipped config is named in the docs: a key added without a line in
docs/ fails here (docs/configs.md holds the shared groups; decoder.md, post-training.md
and others the keys of their own configs)."""

import importlib.util
import re

import pytest


def _keys(cfg, prefix=""):
    for name, value in cfg.items():
        if hasattr(value, "items"):
            yield from _keys(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def _config(path):
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(None)


def test_every_config_key_is_documented(repo):
    docs = "\n".join(p.read_text() for p in sorted((repo / "docs").glob("*.md")))
    paths = sorted((repo / "configs").glob("*.py"))
    assert len(paths) >= 10
    missing = []
    for path in paths:
        for key in _keys(_config(path)):
            leaf = key.rsplit(".", 1)[-1]
            # the dotted key, or its last part as a word (tables list keys by group)
            if key not in docs and not re.search(rf"\b{re.escape(leaf)}\b", docs):
                missing.append(f"{path.name}: {key}")
    assert not missing, "config keys named nowhere in docs/: " + ", ".join(missing)


@pytest.mark.parametrize("key", ["data.no_such_key_documented", "model.zz_width"])
def test_the_check_finds_an_undocumented_key(repo, key):
    """The search above reports a key that no doc names (made-up names)."""
    docs = "\n".join(p.read_text() for p in sorted((repo / "docs").glob("*.md")))
    leaf = key.rsplit(".", 1)[-1]
    assert key not in docs and not re.search(rf"\b{re.escape(leaf)}\b", docs)
