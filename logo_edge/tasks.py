"""BIG-bench tasks for the shipped pool and the evaluation: loading, fixed splits, prompts, scoring.

Data come from the `bigbench==1.0.0` source package on PyPI (its task.json files), fetched once
into the cache and verified by hash; nothing is downloaded from a model or dataset hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import LogoEdgeError


class DataError(LogoEdgeError):
    """Task data could not be fetched or read; the message says from where and why."""

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_FILE = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
N_TEST, N_VAL = 100, 50  # fixed held-out sizes per task (the first N_TEST of the seeded shuffle)


@dataclass(frozen=True)
class Task:
    name: str  # our short name, also the adapter's name
    source: str  # BIG-bench task path
    kind: str  # what sort of work, for the report
    instruction: str
    metric: str = "em"  # "em" (normalized exact match) or "rougeL"
    max_input_chars: int = 600
    max_tokens: int = 16  # generation budget when evaluated
    show_options: bool = True


# The shipped pool: one adapter per task, spanning kinds of work (none is a BBH source task).
POOL_TASKS = [
    Task("sentiment", "multiemo/all_sentence_en", "sentiment",
         "Is the opinion in this sentence positive, negative, neutral or ambivalent?"),
    Task("factcheck", "vitaminc_fact_verification", "fact verification / NLI",
         "Based only on the passage, is the claim True, False, or Neither?"),
    Task("mathqa", "elementary_math_qa/question_only", "math word problems",
         "Solve the math word problem. Answer with one of the options."),
    Task("qasc", "natural_instructions/subtask041_qasc_answer_generation", "reading-comprehension QA",
         "Answer the question using the fact.", metric="rougeL"),
    Task("sql", "semantic_parsing_spider", "text-to-SQL",
         "Write a SQL query that answers the question on a database with the given columns.",
         metric="rougeL", max_tokens=40),
    Task("e2e", "gem/e2e_nlg", "data-to-text generation",
         "Describe the restaurant in one sentence from its attributes.", metric="rougeL", max_tokens=40),
    Task("langid", "language_identification", "classification (language)",
         "Which language is this sentence in? Answer with one of the options."),
    Task("intent", "intent_recognition", "classification (intent)",
         "What is the intent of the utterance? Answer with one of the options."),
    Task("addition", "arithmetic/3_digit_addition", "arithmetic", "Compute the answer. Reply with the number only.",
         show_options=False),
    Task("wikidata", "qa_wikidata", "knowledge QA", "Complete the sentence with a short answer.", metric="rougeL"),
]

# Unseen tasks: BIG-bench sources of the paper's BBH set that ship as task.json (boolean_expressions
# and web_of_lies are programmatic tasks in bigbench 1.0.0 and have no task.json).
UNSEEN_TASKS = [
    Task("causal_judgment", "causal_judgment", "BBH", "Answer the question about causation with Yes or No.",
         max_input_chars=1500),
    Task("formal_fallacies", "formal_fallacies_syllogisms_negation", "BBH",
         "Is the argument, given the premises, valid or invalid?", max_input_chars=1200),
    Task("navigate", "navigate", "BBH", "If you follow these instructions, do you return to the starting point?"),
    Task("object_counting", "object_counting", "BBH", "Answer with a number.", show_options=False),
    Task("sports_understanding", "sports_understanding", "BBH", "Is the following sentence plausible?"),
    Task("word_sorting", "word_sorting", "BBH", "Sort the words alphabetically.", metric="rougeL", max_tokens=40),
]
TASKS = {t.name: t for t in POOL_TASKS + UNSEEN_TASKS}


@dataclass
class Example:
    task: str
    prompt: str  # the user message
    answer: str  # the reference answer used for training and exact match
    refs: tuple[str, ...]  # every accepted answer


def bigbench_archive() -> Path:
    """The bigbench 1.0.0 sdist, fetched once into the cache through pip and checked by hash.

    pip honours the user's index, mirror, proxy and certificates (pip.conf, PIP_INDEX_URL, ...), so
    this works wherever `pip install` does; the hash pins the exact archive whichever index served it."""
    from .native.build import cache_root

    path = cache_root() / "data" / BIGBENCH_FILE
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bigbench-", dir=path.parent))
    try:
        print(f"[logo-edge] fetching the bigbench 1.0.0 source package (358 MB) with pip into {path.parent}",
              flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
               "--no-binary", ":all:", f"bigbench=={BIGBENCH_VERSION}", "-d", str(tmp)]
        res = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)  # pip shows progress
        got = tmp / BIGBENCH_FILE
        if not got.exists():
            raise DataError(f"pip could not fetch bigbench=={BIGBENCH_VERSION} from the package index "
                            f"(exit {res.returncode}):\n{res.stderr[-2000:]}")
        digest = _sha256(got)
        if digest != BIGBENCH_SHA256:
            raise DataError(f"{got}: hash {digest} is not the bigbench {BIGBENCH_VERSION} archive's "
                            f"({BIGBENCH_SHA256}); refusing to use it")
        os.replace(got, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=None)
def _task_json(source: str) -> dict:
    from .native.build import cache_root

    cached = cache_root() / "data" / "bigbench-tasks" / (source.replace("/", "__") + ".json")
    if not cached.exists():
        with tarfile.open(bigbench_archive()) as tar:
            member = tar.extractfile(f"bigbench-1.0.0/bigbench/benchmark_tasks/{source}/task.json")
            data = member.read()
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(data)
    return json.loads(cached.read_text())


def _example(task: Task, ex: dict) -> Example | None:
    text = ex["input"].strip()
    if len(text) > task.max_input_chars:
        return None
    if "target_scores" in ex and task.show_options:
        scores = ex["target_scores"]
        answer = max(scores, key=scores.get)
        options = ", ".join(scores)
        prompt = f"{task.instruction}\n\n{text}\n\nOptions: {options}"
        return Example(task.name, prompt, answer, (answer,))
    target = ex.get("target")
    if target is None:
        scores = ex["target_scores"]
        target = max(scores, key=scores.get)
    refs = tuple([target] if isinstance(target, str) else target)
    return Example(task.name, f"{task.instruction}\n\n{text}", refs[0], refs)


def splits(task: Task) -> dict[str, list[Example]]:
    """Fixed splits by input: a seeded shuffle (seed 0) of the usable examples, grouped by their input (the
    user message) in the order each input first appears; the first inputs are the test split, the next the
    validation split, the rest train. No input is in two splits. A test or validation input that several
    examples share (E2E has several references per attribute set) is one example holding every reference;
    train keeps one example per reference. A task without repeated inputs splits exactly as a plain shuffle."""
    raw = _task_json(task.source)["examples"]
    usable = [e for e in (_example(task, ex) for ex in raw) if e is not None]
    order = np.random.default_rng(0).permutation(len(usable))
    groups: dict[str, list[Example]] = {}
    for i in order:
        groups.setdefault(usable[i].prompt, []).append(usable[i])
    inputs = list(groups.values())
    n_test = min(N_TEST, len(inputs) // 3)
    n_val = min(N_VAL, len(inputs) // 6)

    def merged(group: list[Example]) -> Example:
        refs = tuple(dict.fromkeys(r for e in group for r in e.refs))
        return Example(group[0].task, group[0].prompt, group[0].answer, refs)

    return {"test": [merged(g) for g in inputs[:n_test]], "val": [merged(g) for g in inputs[n_test:n_test + n_val]],
            "train": [e for g in inputs[n_test + n_val:] for e in g]}


# ---- scoring


def normalize(s: str) -> str:
    s = s.strip().splitlines()[0] if s.strip() else ""
    s = s.lower().strip()
    s = re.sub(r"^(the answer is|answer:|intent:|language:)\s*", "", s)
    return re.sub(r"[\s\.\!\?,;:'\"`]+$", "", s).strip()


def exact_match(pred: str, refs: tuple[str, ...]) -> float:
    p = normalize(pred)
    return float(any(p == normalize(r) for r in refs))


def rouge_l(pred: str, refs: tuple[str, ...]) -> float:
    """ROUGE-L F1 on lowercase word tokens, best over references."""
    def lcs(a, b):
        dp = [0] * (len(b) + 1)
        for x in a:
            prev = 0
            for j, y in enumerate(b):
                cur = dp[j + 1]
                dp[j + 1] = prev + 1 if x == y else max(dp[j + 1], dp[j])
                prev = cur
        return dp[-1]

    p = re.findall(r"\w+|[^\w\s]", pred.lower())
    best = 0.0
    for r in refs:
        t = re.findall(r"\w+|[^\w\s]", r.lower())
        if not p or not t:
            continue
        n = lcs(p, t)
        if n:
            prec, rec = n / len(p), n / len(t)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


METRICS = {"em": exact_match, "rougeL": rouge_l}


def score(task: Task, pred: str, refs: tuple[str, ...]) -> float:
    return METRICS[task.metric](pred, refs)


def main(argv: list[str] | None = None) -> int:
    """`python -m logo_edge.tasks --fetch`: fetch the BIG-bench archive now (the test setup does)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--fetch", action="store_true", help="fetch and verify the bigbench archive")
    args = ap.parse_args(argv)
    if args.fetch:
        try:
            print(bigbench_archive())
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
