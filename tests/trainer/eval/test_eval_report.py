import json

from branchmerge.cli import main
from branchmerge.trainer.eval.report import comparison, results_markdown


def _results(name, aime, gpqa, tokens):
    bench = lambda p, t: {"kind": "math", "pass1": p, "stderr": 0.02, "passAtK": {"1": p, "4": min(1, p + 0.1)},
                          "n": 30, "samples": 4, "meanTokens": t, "p95Tokens": 2 * t, "truncated": 0.05}
    return {"name": name, "model": f"file:///models/{name}", "sampling": {"temperature": 0.6, "topP": 0.95},
            "score": (aime + gpqa) / 2, "benchmarks": {"aime24": bench(aime, tokens), "gpqa-diamond": bench(gpqa, tokens)}}


def test_results_markdown_has_a_row_per_benchmark():
    md = results_markdown(_results("merged", 0.781, 0.65, 12345))
    assert "| aime24 | math | 30 | 4 | 78.1 ± 2.0 | 88.1 (k=4) | 12.3k | 24.7k | 5.0 |" in md
    assert "Score (mean pass@1 over benchmarks): **71.5%**" in md


def test_compare_prints_models_by_benchmarks(tmp_path, capsys):
    paths = []
    for name, a, g, t in [("backbone", 0.726, 0.621, 9000), ("tinyr1", 0.781, 0.65, 12000)]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(_results(name, a, g, t)))
        paths.append(str(folder))
    assert main(["compare", *paths]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == ("| model | aime24 pass@1 | gpqa-diamond pass@1 | aime24 tokens | gpqa-diamond tokens | "
                        "score |")
    assert lines[2] == "| backbone | 72.6 ± 2.0 | 62.1 ± 2.0 | 9000 | 9000 | 67.3 |"
    assert lines[3] == "| tinyr1 | 78.1 ± 2.0 | 65.0 ± 2.0 | 12.0k | 12.0k | 71.5 |"
    assert main(["compare", paths[0], str(tmp_path / "tinyr1" / "results.json"), "--label", "A", "--label", "B",
                 "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["A", "B"] and rows[1]["aime24 pass@1"] == "78.1 ± 2.0"


def test_compare_missing_benchmark_and_bad_files(tmp_path, capsys):
    only_aime = _results("x", 0.5, 0.5, 100)
    del only_aime["benchmarks"]["gpqa-diamond"]
    header, rows = comparison([_results("y", 0.4, 0.6, 100), only_aime])
    assert rows[1][2] == "-" and rows[1][-1] == "50.0"
    (tmp_path / "bad.json").write_text("{}")
    assert main(["compare", str(tmp_path / "bad.json")]) == 2
    assert "no 'benchmarks'" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nope")]) == 2
