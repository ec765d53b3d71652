"""docs/performance.md and README's headline are renders of the committed benchmark JSON."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import report

FILES = (*report.BENCHMARK_FILES, report.REJECTED_FILE)


def commit_exists(commit: str) -> bool:
    """Whether ``commit`` names a commit in this clone (CI clones the full history)."""
    found = subprocess.run(
        ["git", "cat-file", "-e", f"{commit}^{{commit}}"],
        cwd=report.ROOT,
        capture_output=True,
        check=False,
    )
    return found.returncode == 0


def copy_results(to: Path) -> Path:
    """The committed JSON files alone (not any local scratch run) in a folder of their own."""
    to.mkdir()
    for name in FILES:
        shutil.copy(report.RESULTS / name, to / name)
    return to


def test_the_committed_page_is_the_render_of_the_committed_json() -> None:
    rendered = report.render_doc(report.load_results(report.RESULTS))
    page = report.DOC.read_text(encoding="utf-8")
    assert page == rendered, "docs/performance.md is stale: run python -m benchmarks.report"


def test_a_changed_figure_changes_the_page_and_the_check_catches_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = copy_results(tmp_path / "results")
    load = json.loads((results / "load.json").read_text(encoding="utf-8"))
    load["results"][0]["throughput"] = 987.6
    (results / "load.json").write_text(json.dumps(load), encoding="utf-8")
    rendered = report.render_doc(report.load_results(results))
    assert "| concurrency 1 | 987.6 |" in rendered
    assert rendered != report.DOC.read_text(encoding="utf-8")

    doc = tmp_path / "performance.md"
    shutil.copy(report.DOC, doc)
    readme = tmp_path / "README.md"
    readme.write_text("# A README without the headline markers\n", encoding="utf-8")
    paths = ["--results", str(results), "--doc", str(doc), "--readme", str(readme)]
    assert report.main(["--check", *paths]) == 1
    assert "987.6" in capsys.readouterr().err  # the diff shows the new figure
    assert report.main(paths) == 0
    assert doc.read_text(encoding="utf-8") == rendered
    assert report.main(["--check", *paths]) == 0
    assert readme.read_text(encoding="utf-8") == "# A README without the headline markers\n"


@pytest.mark.parametrize("name", report.BENCHMARK_FILES)
def test_each_result_names_its_command_commit_date_and_machine(name: str) -> None:
    provenance = json.loads((report.RESULTS / name).read_text(encoding="utf-8"))["provenance"]
    for key in report.REQUIRED_PROVENANCE:
        assert isinstance(provenance.get(key), str), f"{name}: provenance.{key} missing"
        assert provenance[key].strip(), f"{name}: provenance.{key} empty"
    assert "python -m benchmarks." in provenance["command"]
    assert re.match(r"\d{4}-\d{2}-\d{2}\b", provenance["date"])
    assert re.fullmatch(r"[0-9a-f]{7,40}", provenance["commit"])
    assert commit_exists(provenance["commit"]), f"{name}: no commit {provenance['commit']}"


def test_each_rejected_experiment_names_commits_that_exist() -> None:
    data = json.loads((report.RESULTS / report.REJECTED_FILE).read_text(encoding="utf-8"))
    assert data["rejected"]
    for entry in data["rejected"]:
        assert entry["tried"].strip()
        assert entry["result"].strip()
        assert entry["commits"], entry["tried"]
        for commit in entry["commits"]:
            assert re.fullmatch(r"[0-9a-f]{7,40}", commit)
            assert commit_exists(commit), f"{entry['tried']}: no commit {commit}"


def test_every_committed_result_is_rendered() -> None:
    listed = subprocess.run(
        ["git", "ls-files", "benchmarks/results"],
        cwd=report.ROOT,
        capture_output=True,
        check=True,
        text=True,
    ).stdout.split()
    assert {Path(path).name for path in listed} <= set(FILES)


def test_the_readme_headline_block_is_the_render() -> None:
    readme = report.README.read_text(encoding="utf-8")
    headline = report.render_headline(report.load_results(report.RESULTS))
    # Without the markers there is no block to check (and the renderer leaves README alone).
    block = report.headline_block(readme)
    assert block is None or block == "\n" + headline, "run python -m benchmarks.report"


def test_the_headline_replaces_only_the_text_between_the_markers() -> None:
    readme = f"# Title\n\nbefore\n{report.HEADLINE_START}\nold\n{report.HEADLINE_END}\nafter\n"
    replaced = report.replace_headline(readme, "| new |\n")
    assert replaced == (
        f"# Title\n\nbefore\n{report.HEADLINE_START}\n| new |\n{report.HEADLINE_END}\nafter\n"
    )
    assert report.replace_headline(replaced, "| new |\n") == replaced
    assert report.replace_headline("# Title\n", "| new |\n") is None
    assert report.replace_headline(f"{report.HEADLINE_END}\n{report.HEADLINE_START}\n", "x") is None
