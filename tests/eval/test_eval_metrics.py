import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from amortize.eval import evaluate, format_jsonl, format_markdown
from amortize.eval.retrieval import RetrievalTask, flatten_captions, recall_at_k, retrieval_metrics
from amortize.eval.zeroshot import ZeroShotTask, fill_template, mean_per_class_recall, topk_accuracy
from amortize.eval.datacomp import jaccard, macro_f1, worst_group_accuracy


def test_import_eval_does_not_import_composer():
    assert "amortize.eval" in sys.modules
    import subprocess
    code = "import amortize.eval, sys; print('composer' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_topk_and_mean_per_class_recall():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    labels = torch.tensor([0, 2, 2, 1])
    acc = topk_accuracy(logits, labels, (1, 2, 5))
    assert acc["top1"] == pytest.approx(0.5) and acc["top2"] == pytest.approx(1.0) and "top5" not in acc
    # class 0: 1/1, class 1: 0/1, class 2: 1/2
    assert mean_per_class_recall(logits.argmax(1), labels, 3) == pytest.approx((1 + 0 + 0.5) / 3)


def test_recall_at_k_multiple_captions():
    img = torch.eye(3)
    txt = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0.9, 1], [0, 0, 1]]), dim=-1)
    owner = torch.tensor([0, 1, 2, 2])
    m = retrieval_metrics(img, txt, owner, (1, 2))
    assert m["image_to_text_R@1"] == 1.0
    assert m["text_to_image_R@1"] == pytest.approx(1.0)
    assert m["mean_R@1"] == pytest.approx(1.0)
    scores = torch.tensor([[0.1, 0.9, 0.5]])
    pos = torch.tensor([[True, False, False]])
    assert recall_at_k(scores, pos, (1, 2, 3, 10)) == {1: 0.0, 2: 0.0, 3: 1.0, 10: 1.0}
    texts, own = flatten_captions(["a", ["b", "c"]])
    assert texts == ["a", "b", "c"] and own.tolist() == [0, 1, 1]


def test_small_metrics():
    assert macro_f1(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1])) == pytest.approx((2 / 3 + 0.8) / 2)
    assert worst_group_accuracy(torch.tensor([1, 0, 1, 1]).bool(), torch.tensor([0, 0, 1, 2]), {2}) == 0.5
    assert jaccard(torch.tensor([1, 1, 0]).numpy().astype(bool), torch.tensor([1, 0, 1]).numpy().astype(bool)) == pytest.approx(1 / 3)
    assert fill_template("a {c} photo", "cat") == "a cat photo" and fill_template("x {}.", "y") == "x y."


class _Oracle(torch.nn.Module):
    """Image i is the one-hot e_i; a caption's token after the start token picks its direction."""

    def __init__(self, n):
        super().__init__()
        self.n = n
        self.w = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, x):
        return x.flatten(1)[:, : self.n]

    def encode_text(self, tokens):
        return F.one_hot(tokens[:, 0], self.n).float()


def _tok(texts):
    return torch.tensor([[int(t.split()[-1])] for t in texts])


def test_evaluate_oracle_scores_one_and_reports():
    n = 6
    images = torch.eye(n).view(n, 1, 1, n).expand(n, 3, 1, n).contiguous()
    tasks = [ZeroShotTask("zs", images, torch.arange(n), [str(i) for i in range(n)], ["class {}"]),
             RetrievalTask("ret", images, [f"item {i}" for i in range(n)])]
    model = _Oracle(n)
    model.train()
    rows = evaluate(model, _tok, tasks, batch_size=4)
    assert model.training
    vals = {(r["task"], r["metric"]): r["value"] for r in rows}
    assert vals[("zs", "top1")] == 1.0 and vals[("ret", "image_to_text_R@1")] == 1.0
    assert vals[("ret", "text_to_image_R@5")] == 1.0
    md = format_markdown(rows)
    assert md.splitlines()[0] == "| task | metric | value |" and "| zs | top1 | 1.0000 |" in md
    lines = format_jsonl(rows + [{"task": "x", "metric": "m", "value": math.nan}]).splitlines()
    objs = [json.loads(line) for line in lines]
    assert all({"task", "metric", "value"} <= set(o) for o in objs) and objs[-1]["value"] is None
