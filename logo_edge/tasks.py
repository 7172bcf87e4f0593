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
# The large pool (issue 18): one adapter per further BIG-bench task, none a BBH source task and none sharing
# inputs with another pool task; with POOL_TASKS, 70 distinct tasks. Inputs are kept short for training speed.
_L = dict(max_input_chars=500)
LARGE_TASKS = [
    Task("proverb_story", "abstract_narrative_understanding/4_distractors", "narrative understanding",
         "Which proverb does this story illustrate? Answer with one of the options.", **_L),
    Task("analogy_kind", "analogical_similarity", "analogy", "What kind of similarity relates the two episodes? "
         "Answer with one of the options.", **_L),
    Task("multiply2", "arithmetic/2_digit_multiplication", "arithmetic", "Compute the answer. Reply with the number "
         "only.", show_options=False),
    Task("divide3", "arithmetic/3_digit_division", "arithmetic", "Compute the quotient. Reply with the number only.",
         show_options=False),
    Task("category", "auto_categorization", "categorization", "Name the category the items belong to.",
         metric="rougeL"),
    Task("bbq_gender", "bbq_lite_json/gender_identity_ambig", "bias QA", "Answer the question about the context. "
         "Answer with one of the options.", **_L),
    Task("bbq_age", "bbq_lite_json/age_disambig", "bias QA (disambiguated)", "Read the context and answer who it "
         "was. Answer with one of the options.", **_L),
    Task("checkmate", "checkmate_in_one", "chess", "Find the move that checkmates in one. Reply with the move in "
         "algebraic notation.", show_options=False, **_L),
    Task("chess_square", "chess_state_tracking/real_short", "chess state tracking", "Complete the last move's "
         "destination square.", **_L),
    Task("crt", "chinese_remainder_theorem", "number theory", "Solve the puzzle. Reply with the number only.", **_L),
    Task("color_hex", "color/hex", "color naming", "Name the color of this code. Answer with one of the options."),
    Task("cryptic", "cryptonite", "cryptic crosswords", "Solve the cryptic crossword clue; the number is the "
         "answer's length."),
    Task("parens", "cs_algorithms/valid_parentheses", "algorithms", "Are these brackets properly matched? Answer "
         "Valid or Invalid."),
    Task("epistemic", "epistemic_reasoning", "epistemic NLI", "Does the premise entail the hypothesis? Answer "
         "entailment or non-entailment.", **_L),
    Task("fever", "fact_checker/fever", "claim verification", "Answer true or false."),
    Task("czech_nlg", "gem/cs_restaurants", "dialogue-act generation (Czech)", "Write the Czech restaurant "
         "assistant's reply for this dialogue act.", metric="rougeL", max_tokens=40),
    Task("common_gen", "gem/common_gen", "constrained generation", "Write one sentence that uses all these "
         "concepts.", metric="rougeL", max_tokens=32),
    Task("goal", "goal_step_wikihow/goal_inference", "procedural goals", "Which goal is the step for? Answer with "
         "one of the options."),
    Task("step_order", "goal_step_wikihow/step_ordering", "procedural ordering", "Which step should happen first? "
         "Answer with one of the options."),
    Task("implicature", "implicatures", "pragmatics", "Does Speaker 2's answer mean yes or no?"),
    Task("ipa", "international_phonetic_alphabet_transliterate", "transliteration", "Transliterate between the "
         "International Phonetic Alphabet and English.", metric="rougeL", max_tokens=40),
    Task("kanji", "kanji_ascii/kanji_ascii_pronunciation", "ASCII-art kanji", "How is the kanji drawn here read? "
         "Reply with its reading in romaji."),
    Task("kannada", "kannada", "riddles (Kannada)", "Solve the riddle. Answer with one of the options."),
    Task("pig_latin", "language_games/pig_latin_encode", "word games", "Translate the sentence into Pig Latin.",
         metric="rougeL", max_tokens=32),
    Task("plural", "linguistic_mappings/plural_json", "morphology", "Give the plural of the noun."),
    Task("question_form", "linguistic_mappings/question_formation_json", "syntax", "Turn the statement into a yes/no "
         "question.", metric="rougeL"),
    Task("negation", "linguistic_mappings/sentence_negation_json", "syntax", "Negate the sentence.",
         metric="rougeL"),
    Task("past_tense", "linguistic_mappings/past_tense_json", "morphology", "Give the past tense of the verb."),
    Task("list_fn", "list_functions/00_shot_baseline", "list functions", "Apply the hidden function to the list. "
         "Reply with the output list."),
    Task("fallacy", "logical_fallacy_detection", "logic", "Is the statement's reasoning Valid or Invalid?", **_L),
    Task("matrix_shape", "matrixshapes", "tensor shapes", "Give the shape of the result.", **_L),
    Task("metaphor", "metaphor_boolean", "figurative language", "Is the second sentence a correct paraphrase of the "
         "metaphor? Answer True or False."),
    Task("plus_one", "modified_arithmetic/three_digit_addition_plus_one", "induction (arithmetic)", "Find the "
         "operation from the examples and apply it to the last line. Reply with the number only.", **_L),
    Task("moral", "moral_permissibility", "moral judgement", "Is it morally permissible? Answer Yes or No.", **_L),
    Task("dialog_speaker", "movie_dialog_same_or_different", "dialogue", "Are the last two lines said by the same "
         "speaker or different speakers?", **_L),
    Task("winogrande", "natural_instructions/subtask033_winogrande_answer_generation", "coreference",
         "Fill the blank with one of the two objects in the question.", metric="rougeL"),
    Task("overlap", "natural_instructions/subtask039_qasc_find_overlapping_words", "lexical overlap",
         "Name a word the two sentences share.", **_L),
    Task("question_type", "natural_instructions/subtask046_miscellaenous_question_typing", "question typing",
         "What type is this question-answer pair (for example date, person, quantity, location)?"),
    Task("answerable", "natural_instructions/subtask050_multirc_answerability", "answerability",
         "Is the sentence enough to answer the question? Answer Yes or No."),
    Task("temporal", "natural_instructions/subtask018_mctaco_temporal_reasoning_presence", "temporal reasoning",
         "Does the question involve temporal reasoning? Answer Yes or No."),
    Task("question_gen", "natural_instructions/subtask023_cosmosqa_question_generation", "question generation",
         "Write a common-sense question about the context.", metric="rougeL", max_tokens=32, **_L),
    Task("fact_question", "natural_instructions/subtask040_qasc_question_generation", "question generation",
         "Turn the fact into a question.", metric="rougeL", max_tokens=24),
    Task("essential", "natural_instructions/subtask044_essential_terms_identifying_essential_words",
         "keyword extraction", "List the words of the question essential to answering it.", metric="rougeL",
         max_tokens=24),
    Task("timepoint", "natural_instructions/subtask013_mctaco_answer_generation_absolute_timepoint",
         "temporal QA", "When did it happen? Answer briefly.", metric="rougeL"),
    Task("persian_qa", "parsinlu_qa", "QA (Persian)", "Answer the question. Answer with one of the options."),
    Task("element", "periodic_elements/subtask_1", "chemistry", "Name the element."),
    Task("polish_ner", "polish_sequence_labeling", "sequence labelling (Polish)", "Replace each token with its "
         "label.", metric="rougeL", max_tokens=40),
    Task("presupposition", "presuppositions_as_nli", "NLI (presupposition)", "Answer entailment, neutral or "
         "contradiction.", **_L),
    Task("turing", "simp_turing_concept/witness_set", "program induction", "Give the output for the last input."),
    Task("social_iqa", "social_iqa", "social commonsense", "Answer with one of the options."),
    Task("support", "social_support", "social support", "Is the message supportive, neutral or unsupportive?",
         **_L),
    Task("strategy", "strategyqa", "multi-step QA", "Answer Yes or No."),
    Task("tense", "tense", "grammar", "Rewrite the sentence in the tense asked for.", metric="rougeL"),
    Task("si_units", "unit_conversion/si_conversion", "unit conversion", "Convert the quantity. Answer with one of "
         "the options."),
    Task("unit_id", "unit_conversion/unit_identification", "unit identification", "Answer with one of the "
         "options."),
    Task("units_systems", "unit_conversion/different_systems", "unit conversion", "Convert between the unit "
         "systems. Answer with one of the options."),
    Task("date_format", "unnatural_in_context_learning/dates", "format mapping", "Rewrite the date in the "
         "target format."),
    Task("winowhy", "winowhy", "coreference explanation", "Is the explanation of the pronoun correct or "
         "incorrect?", **_L),
    Task("unscramble", "word_unscrambling", "word games", "Unscramble the word. Reply with the word only."),
    Task("anachronism", "anachronisms", "anachronisms", "Does the sentence contain an anachronism? Answer Yes or "
         "No."),
    Task("hindu", "hindu_knowledge", "knowledge (Hindu mythology)", "Answer with one of the options."),
    Task("physics", "physics", "physics formulas", "Which formula is most useful for this problem? Answer with "
         "one of the options.", **_L),
    Task("misconception", "misconceptions", "misconceptions", "Is the statement true? Output T or F."),
    Task("polarity", "entailed_polarity", "entailed polarity", "Given the fact, answer the question with yes or "
         "no."),
    Task("toxicity", "hinglish_toxicity", "toxicity (Hinglish)", "Is the sentence toxic? Answer yes or no.", **_L),
    Task("swahili", "swahili_english_proverbs", "proverbs (Swahili)", "Which English proverb is closest in "
         "meaning? Answer with one of the options."),
    Task("operators", "operators", "symbolic operators", "Compute the result of the defined operator."),
    Task("fantasy", "fantasy_reasoning", "counterfactual reasoning", "Answer Yes. or No.", **_L),
]
TASKS = {t.name: t for t in POOL_TASKS + UNSEEN_TASKS + LARGE_TASKS}


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


def _cached_task_path(source: str) -> Path:
    from .native.build import cache_root

    return cache_root() / "data" / "bigbench-tasks" / (source.replace("/", "__") + ".json")


@lru_cache(maxsize=None)
def _task_json(source: str) -> dict:
    cached = _cached_task_path(source)
    if not cached.exists():  # one pass over the archive extracts every task logo-edge knows (a gzip tar is read
        # in order, so one member costs as much as all of them)
        wanted = {f"bigbench-1.0.0/bigbench/benchmark_tasks/{s}/task.json": s
                  for s in {t.source for t in TASKS.values()} | {source}}
        with tarfile.open(bigbench_archive()) as tar:
            for member in tar:
                if member.name in wanted and not _cached_task_path(wanted[member.name]).exists():
                    path = _cached_task_path(wanted[member.name])
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(".tmp")
                    tmp.write_bytes(tar.extractfile(member).read())
                    os.replace(tmp, path)
        if not cached.exists():
            raise DataError(f"{bigbench_archive()}: no task {source!r} in the bigbench archive")
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
