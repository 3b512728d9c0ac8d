"""scripts/demo_table.py rewrites the README's demo table between its markers (no training here)."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("demo_table", ROOT / "scripts" / "demo_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo_table = _load_script()

FAKE_EVAL = "".join(json.dumps(r) + "\n" for r in [
    {"task": "fashion_mnist_test", "metric": "top1", "value": 0.81464},
    {"task": "fashion_mnist_test", "metric": "top5", "value": 0.99},
    {"task": "emoji_heldout", "metric": "mean_R@1", "value": 0.251358},
    {"task": "emoji_heldout", "metric": "image_to_text_R@1", "value": None},
])


def _block(**kw):
    args = dict(wall_s=493.4, date="2026-11-30", cpu="AMD EPYC", cores=2, kernels="AVX512", commit="abc1234")
    args.update(kw)
    return demo_table.render_block(demo_table.parse_eval_jsonl(FAKE_EVAL), **args)


def test_block_has_the_table_and_where_it_came_from():
    assert _block().splitlines() == [
        "| task | metric | value |",
        "|---|---|---|",
        "| fashion_mnist_test | top1 | 0.8146 |",
        "| fashion_mnist_test | top5 | 0.9900 |",
        "| emoji_heldout | mean_R@1 | 0.2514 |",
        "| emoji_heldout | image_to_text_R@1 | n/a |",
        "",
        "Made by `make demo-table` on 2026-11-30 at commit `abc1234`: "
        "training and evaluation took 8 min 13 s on AMD EPYC (2 cores, PyTorch AVX512 CPU kernels).",
    ]


@pytest.mark.parametrize("seconds,text", [(493.4, "8 min 13 s"), (42.0, "42 s"), (59.6, "1 min 0 s"), (0, "0 s")])
def test_format_duration(seconds, text):
    assert demo_table.format_duration(seconds) == text


def test_rewrite_replaces_only_the_marked_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nbefore\n\n<!-- demo-table:start -->\n| old | table |\nold line\n"
                      "<!-- demo-table:end -->\n\nafter\n")
    demo_table.rewrite_files(_block(), files=["README.md"], root=tmp_path)
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n\n<!-- demo-table:start -->\n| task | metric | value |\n")
    assert text.endswith("PyTorch AVX512 CPU kernels).\n<!-- demo-table:end -->\n\nafter\n")
    assert "old" not in text
    # rewriting again with the same block changes nothing (the markers survive)
    demo_table.rewrite_files(_block(), files=["README.md"], root=tmp_path)
    assert readme.read_text() == text


def test_main_rewrites_from_an_eval_json(tmp_path, monkeypatch, capsys):
    for name in ("README.md", "index.md"):
        (tmp_path / name).write_text(f"{name}\n<!-- demo-table:start -->\nx\n<!-- demo-table:end -->\n")
    (tmp_path / "eval.jsonl").write_text(FAKE_EVAL)
    monkeypatch.setattr(demo_table, "ROOT", tmp_path)
    monkeypatch.setattr(demo_table, "git_commit", lambda root=None: "abc1234")
    assert demo_table.main(["--eval-json", str(tmp_path / "eval.jsonl"), "--wall-s", "61",
                            "--files", "README.md", "index.md"]) == 0
    for name in ("README.md", "index.md"):
        text = (tmp_path / name).read_text()
        assert "| fashion_mnist_test | top1 | 0.8146 |" in text and "took 1 min 1 s on " in text
        assert re.search(r"Made by `scripts/demo_table.py --eval-json` from a `make demo` run "
                         r"on \d{4}-\d{2}-\d{2} at commit `abc1234`", text)
        assert re.search(r" \(\d+ cores, PyTorch [\w ]+ CPU kernels\)\.\n<!-- demo-table:end -->\n$", text)
    assert "rewrote the demo table in README.md" in capsys.readouterr().out


def test_missing_or_repeated_markers_are_named():
    with pytest.raises(ValueError, match="README.md needs exactly one <!-- demo-table:start -->"):
        demo_table.replace_block("no markers", "x", where="README.md")
    twice = "<!-- demo-table:start -->\n<!-- demo-table:end -->\n" * 2
    with pytest.raises(ValueError, match="exactly one"):
        demo_table.replace_block(twice, "x")
    with pytest.raises(ValueError, match="exactly one"):
        demo_table.replace_block("<!-- demo-table:end -->\n<!-- demo-table:start -->\n", "x")


def test_bad_eval_output_is_refused():
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        demo_table.parse_eval_jsonl('{"task": "a", "metric": "b", "value": 1}\nTraceback ...\n')
    with pytest.raises(ValueError, match="line 1 lacks value"):
        demo_table.parse_eval_jsonl('{"task": "a", "metric": "b"}\n')
    with pytest.raises(ValueError, match="no rows"):
        demo_table.parse_eval_jsonl("\n")


def test_the_shipped_pages_carry_one_marked_block_each():
    for name in demo_table.FILES:
        text = (ROOT / name).read_text()
        assert text.count(demo_table.START) == 1 and text.count(demo_table.END) == 1, name
        block = text.split(demo_table.START)[1].split(demo_table.END)[0]
        assert "| fashion_mnist_test | top1 |" in block and "| emoji_heldout | mean_R@1 |" in block, name
