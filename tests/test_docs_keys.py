"""Every key of every shipped config is named in the docs: a key added without a line in
docs/ fails here (docs/configs.md holds the shared groups; decoder.md, post-training.md
and others the keys of their own configs)."""

import re

import ml_collections
import pytest

from mmgen.config import _flat_keys, load_config_file


def _docs(repo) -> str:
    return "\n".join(p.read_text() for p in sorted((repo / "docs").glob("*.md")))


def _documented(key: str, docs: str) -> bool:
    """The dotted key, or its last part as a word (tables list keys by group)."""
    leaf = key.rsplit(".", 1)[-1]
    return key in docs or re.search(rf"\b{re.escape(leaf)}\b", docs) is not None


def test_every_config_key_is_documented(repo):
    docs = _docs(repo)
    paths = sorted((repo / "configs").glob("*.py"))
    assert len(paths) >= 10
    missing = []
    for path in paths:
        cfg = load_config_file(str(path))
        # ConfigDict reads dotted keys; groups are not keys to document one by one
        leaves = [k for k in _flat_keys(cfg)
                  if not isinstance(cfg[k], ml_collections.ConfigDict)]
        missing += [f"{path.name}: {k}" for k in leaves if not _documented(k, docs)]
    assert not missing, "config keys named nowhere in docs/: " + ", ".join(missing)


@pytest.mark.parametrize("key", ["data.no_such_key_documented", "model.zz_width"])
def test_the_check_finds_an_undocumented_key(repo, key):
    """The check above reports a key that no doc names (made-up names)."""
    assert not _documented(key, _docs(repo))
