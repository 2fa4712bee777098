"""Zero-shot multiple-choice tasks scored by log-likelihood, as lm-evaluation-harness (v0.4) does.

Each task turns a data row into a `Doc`: one (context, continuation) request per choice, the gold index,
and the strings lm-eval divides by for `acc_norm` (the choice texts, without the leading space).
Prompt formats are lm-eval's:
  piqa          "Question: {goal}\\nAnswer:" + " {sol}"                          acc, acc_norm
  arc_easy/_ch  "Question: {stem}\\nAnswer:" + " {choice text}"                  acc, acc_norm
  winogrande    sentence[:_] + option      + " " + sentence[_+1:].strip()       acc (partial scoring)
  boolq         "{passage}\\nQuestion: {question}?\\nAnswer:" + " no" | " yes"  acc
Requests are tokenized as lm-eval's `_encode_pair` and scored in padded batches (`quant.eval_score`).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quant.eval import require_data

TASK_NAMES = ("piqa", "arc_easy", "arc_challenge", "winogrande", "boolq")
# The metric lm-eval's papers quote per task (acc_norm where lm-eval reports it).
HEADLINE_METRIC = {"piqa": "acc_norm", "arc_easy": "acc_norm", "arc_challenge": "acc_norm",
                   "winogrande": "acc", "boolq": "acc"}
TASK_FILES = {
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "arc_easy": ("arc/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc/ARC-Challenge-Test.jsonl",),
    "winogrande": ("winogrande/dev.jsonl",),
    "boolq": ("boolq/dev.jsonl",),
}


@dataclass
class Doc:
    requests: list[tuple[str, str]]  # (context, continuation) per choice
    gold: int
    choices: list[str]  # acc_norm divides each choice's log-likelihood by len(choice) (characters, as lm-eval)


def _jsonl(path: Path, limit: int | None) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def _labels(path: Path, limit: int | None) -> list[int]:
    labels = [int(x) for x in path.read_text().split()]
    return labels[:limit] if limit is not None else labels


def piqa_docs(limit: int | None = None) -> list[Doc]:
    data, labels = require_data(*TASK_FILES["piqa"])
    rows, gold = _jsonl(data, limit), _labels(labels, limit)
    if len(gold) < len(rows):
        raise ValueError(f"{labels}: {len(gold)} labels for {len(rows)} rows")
    docs = []
    for row, g in zip(rows, gold):
        ctx = f"Question: {row['goal']}\nAnswer:"
        choices = [row["sol1"], row["sol2"]]
        docs.append(Doc([(ctx, " " + c) for c in choices], g, choices))
    return docs


def arc_docs(task: str, limit: int | None = None) -> list[Doc]:
    """ARC-Easy or ARC-Challenge; labels A-E or 1-5, the gold is the answerKey's index among them."""
    (data,) = require_data(*TASK_FILES[task])
    docs = []
    for row in _jsonl(data, limit):
        q = row["question"]
        labels = [c["label"] for c in q["choices"]]
        choices = [c["text"] for c in q["choices"]]
        ctx = f"Question: {q['stem']}\nAnswer:"
        docs.append(Doc([(ctx, " " + c) for c in choices], labels.index(row["answerKey"]), choices))
    return docs


def winogrande_docs(limit: int | None = None) -> list[Doc]:
    """Partial evaluation: the option fills the context up to "_", the shared rest is scored."""
    (data,) = require_data(*TASK_FILES["winogrande"])
    docs = []
    for row in _jsonl(data, limit):
        s = row["sentence"]
        i = s.index("_")
        cont = " " + s[i + 1:].strip()
        contexts = [s[:i] + row["option1"], s[:i] + row["option2"]]
        # lm-eval's completion_len uses the contexts here (multiple inputs); only acc is reported.
        docs.append(Doc([(c, cont) for c in contexts], int(row["answer"]) - 1, contexts))
    return docs


def boolq_docs(limit: int | None = None) -> list[Doc]:
    (data,) = require_data(*TASK_FILES["boolq"])
    docs = []
    for row in _jsonl(data, limit):
        ctx = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
        docs.append(Doc([(ctx, " no"), (ctx, " yes")], int(bool(row["answer"])), ["no", "yes"]))
    return docs


LOADERS: dict[str, Callable[[int | None], list[Doc]]] = {
    "piqa": piqa_docs,
    "arc_easy": lambda limit=None: arc_docs("arc_easy", limit),
    "arc_challenge": lambda limit=None: arc_docs("arc_challenge", limit),
    "winogrande": winogrande_docs,
    "boolq": boolq_docs,
}


def load_task(name: str, limit: int | None = None) -> list[Doc]:
    if name not in LOADERS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASK_NAMES)}")
    return LOADERS[name](limit)


def task_files(names: list[str]) -> list[str]:
    return [f for n in names for f in TASK_FILES[n]]


def accuracy(docs: list[Doc], loglikelihoods: list[list[float]]) -> dict:
    """acc, acc_norm and their standard errors (sample std / sqrt(n), as lm-eval) over `docs`."""
    acc = norm = 0
    for doc, lls in zip(docs, loglikelihoods):
        acc += max(range(len(lls)), key=lls.__getitem__) == doc.gold
        normed = [ll / len(c) for ll, c in zip(lls, doc.choices)]
        norm += max(range(len(normed)), key=normed.__getitem__) == doc.gold
    n = len(docs)

    def stderr(k: int) -> float:
        p = k / n
        return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")

    return {"acc": acc / n, "acc_stderr": stderr(acc), "acc_norm": norm / n, "acc_norm_stderr": stderr(norm), "n": n}
