"""A local lm-eval multiple-choice task: a task YAML over a JSONL file, both written by the test.

lm-eval reads ``doc_to_text`` as the context and scores each choice as the continuation
``" " + choice`` (its default target delimiter); accuracy is the share of documents whose gold
choice has the highest summed log-likelihood, ``acc_norm`` the same after dividing by the
choice's length in characters.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from data_fixtures import sample_lines

TASK = "sentinel_toy_mc"

_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def mc_documents(n: int = 12, seed: int = 5) -> list[dict]:
    """Questions made of the tiny tokenizer's words, 2-4 choices each, the gold index spread out."""
    rng = random.Random(seed)
    docs = []
    for i, line in enumerate(sample_lines(n, seed=seed, min_words=4, max_words=8)):
        words = line.rstrip(".").split()
        choices = [" ".join(rng.sample(words, k=min(2, len(words)))) for _ in range(rng.randint(2, 4))]
        docs.append({"question": " ".join(words[:3]), "choices": choices, "answer": i % len(choices)})
    return docs


def write_mc_task(folder: Path, docs: list[dict] | None = None, *, task: str = TASK,
                  dataset_path: str | None = None) -> Path:
    """Write ``folder/<task>.yaml`` and its JSONL; ``dataset_path`` replaces the local JSON loader
    (e.g. a Hub dataset name, to see the offline error)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in (docs or mc_documents())), encoding="utf-8")
    text = _YAML.format(task=task, data=data)
    if dataset_path is not None:
        text = text.replace("dataset_path: json\ndataset_kwargs:\n  data_files:\n"
                            f"    test: {data}\n", f"dataset_path: {dataset_path}\n")
    (folder / f"{task}.yaml").write_text(text, encoding="utf-8")
    return folder


def choice_logliks(model, tokenizer, doc) -> list[float]:
    """Sum of log p(choice tokens | question) per choice; the continuation is " " + choice, as in lm-eval."""
    lls = []
    context = tokenizer(doc["question"], add_special_tokens=False).input_ids
    for choice in doc["choices"]:
        whole = tokenizer(doc["question"] + " " + choice, add_special_tokens=False).input_ids
        assert whole[:len(context)] == context, "the choice must start a new token, or the split is ambiguous"
        continuation = whole[len(context):]
        with torch.no_grad():
            logprobs = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
        lls.append(sum(float(logprobs[len(context) + i - 1, token]) for i, token in enumerate(continuation)))
    return lls


def expected_accuracy(model, tokenizer, docs) -> dict[str, float]:
    acc, acc_norm = [], []
    for doc in docs:
        lls = np.array(choice_logliks(model, tokenizer, doc))
        lengths = np.array([float(len(c)) for c in doc["choices"]])
        acc.append(float(np.argmax(lls) == doc["answer"]))
        acc_norm.append(float(np.argmax(lls / lengths) == doc["answer"]))
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}
