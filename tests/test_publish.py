"""Publishing: `python3 tasks.py site` stages a self-contained site, and the workflow deploys that folder."""

from __future__ import annotations

import pytest
import yaml
from helpers import ROOT, load_script

tasks = load_script("tasks.py")
WORKFLOW = ROOT / ".github" / "workflows" / "publish.yml"
TEST_WORKFLOW = ROOT / ".github" / "workflows" / "test.yml"


def built_book(path):
    """A minimal built book: an index page, a page in a folder, its own MathJax and Sphinx's leftovers."""
    (path / "_static" / "mathjax").mkdir(parents=True)
    (path / tasks.MATHJAX).write_text("/* MathJax */")
    (path / "index.html").write_text('<script src="_static/mathjax/tex-chtml.js"></script>')
    (path / "book").mkdir()
    (path / "book" / "intro.html").write_text("<h1>Intro</h1>")
    (path / ".buildinfo").write_text("config: 0")
    return path


def test_the_site_is_the_built_book_with_nojekyll_and_without_sphinx_leftovers(tmp_path):
    html = built_book(tmp_path / "html")
    output = tmp_path / "site"
    output.mkdir()
    (output / "stale.html").write_text("from an older build")
    tasks.stage_site(html, output)
    found = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())
    assert found == [".nojekyll", "_static/mathjax/tex-chtml.js", "book/intro.html", "index.html"]
    assert not (tmp_path / "site.partial").exists()


def test_a_broken_build_leaves_the_previous_site_in_place(tmp_path):
    output = tmp_path / "site"
    output.mkdir()
    (output / "index.html").write_text("the site as it was")
    empty = tmp_path / "html"
    empty.mkdir()
    with pytest.raises(tasks.StepFailed, match="no index.html"):
        tasks.stage_site(empty, output)
    online = built_book(tmp_path / "online")
    (online / tasks.MATHJAX).unlink()
    with pytest.raises(tasks.StepFailed, match="mathjax"):
        tasks.stage_site(online, output)
    assert (output / "index.html").read_text() == "the site as it was"


def test_the_workflow_builds_with_tasks_py_and_deploys_that_folder_to_pages_on_push_to_main():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads the key `on` as true
    assert triggers["push"]["branches"] == ["main"] and "workflow_dispatch" in triggers
    assert workflow["permissions"]["pages"] == "write" and workflow["permissions"]["id-token"] == "write"
    build = workflow["jobs"]["build"]["steps"]
    commands = [step["run"] for step in build if "run" in step]
    assert commands == ["python3 tasks.py site --output site"]
    uploads = [step for step in build if step.get("uses", "").startswith("actions/upload-pages-artifact@")]
    assert len(uploads) == 1 and uploads[0]["with"]["path"] == "site" == tasks.SITE.name
    deploy = workflow["jobs"]["deploy"]
    assert deploy["needs"] == "build" and deploy["environment"]["name"] == "github-pages"
    assert any(step.get("uses", "").startswith("actions/deploy-pages@") for step in deploy["steps"])


def test_the_test_workflow_runs_ci_and_keeps_the_browser_checks_screenshots_even_when_it_fails():
    workflow = yaml.safe_load(TEST_WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads the key `on` as true
    assert "push" in triggers and "pull_request" in triggers
    steps = workflow["jobs"]["test"]["steps"]
    assert [step["run"] for step in steps if "run" in step] == ["bash .ci/run"]
    uploads = [step for step in steps if step.get("uses", "").startswith("actions/upload-artifact@")]
    assert len(uploads) == 1 and uploads[0]["if"] == "always()"
    assert uploads[0]["with"]["path"] == str(tasks.SCREENSHOTS.relative_to(ROOT))


def test_the_site_command_is_offered_with_an_output_folder():
    parser_help = tasks.__doc__
    assert "python3 tasks.py site" in parser_help
    with pytest.raises(SystemExit) as exit_info:
        tasks.main(["site", "--help"])
    assert exit_info.value.code == 0
