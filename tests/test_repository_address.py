"""The repository address lives in _config.yml; every place that names it follows (issue: one setting)."""

from __future__ import annotations

from helpers import ROOT, load_script

tasks = load_script("tasks.py")


def test_every_named_address_is_the_configured_one():
    url = tasks.repository_url()
    assert url.startswith("https://")
    named = {}
    for path in tasks.address_files():
        for match in tasks.ADDRESS.finditer(path.read_text(encoding="utf-8")):
            named.setdefault(match.group(2), []).append(str(path.relative_to(ROOT)))
    assert set(named) == {url}, f"addresses other than _config.yml's {url}: run `python3 tasks.py repository` ({named})"
    assert any(path.endswith(".ipynb") for path in named[url]) and "pyproject.toml" in named[url]


def test_sync_writes_the_configured_address_and_nothing_else(tmp_path):
    (tmp_path / "_config.yml").write_text("title: x\nrepository:\n  # a comment\n  url: https://github.com/someone/fork\n"
                                          "  branch: main\n")
    (tmp_path / "book").mkdir()
    chapter = tmp_path / "book" / "chapter.ipynb"
    chapter.write_text('{"source": ["    %pip install -q \\"fedlora-edu @ git+https://github.com/old/place\\"\\n", '
                       '"the authors\' code: https://github.com/alibaba/FederatedScope"]}')
    (tmp_path / "pyproject.toml").write_text('[project.urls]\nHomepage = "https://github.com/old/place"\n')
    changed = tasks.sync_repository(tmp_path)
    assert sorted(p.name for p in changed) == ["chapter.ipynb", "pyproject.toml"]
    text = chapter.read_text()
    assert "git+https://github.com/someone/fork\\\"" in text and "https://github.com/alibaba/FederatedScope" in text
    assert (tmp_path / "pyproject.toml").read_text().endswith('Homepage = "https://github.com/someone/fork"\n')
    assert tasks.sync_repository(tmp_path) == []  # a second run changes nothing
