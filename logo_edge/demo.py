"""`logo-edge demo`: held-out examples of the shipped tasks, answered by the base model and routed, side by side.

The examples ship in `data/demo_examples.json`, chosen by a fixed rule from the tasks' held-out test
splits: for each task of the shipped pool, the example with the shortest prompt among the first
DEMO_WINDOW of its test split whose input does not also occur in the training split (BIG-bench repeats
some inputs with other targets), the first such on ties, so it reads in a terminal.
`python -m logo_edge.demo --write-examples` regenerates the file from the BIG-bench data; a test
checks the shipped file equals what the rule gives.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

EXAMPLES_FILE = Path(__file__).with_name("data") / "demo_examples.json"
DEMO_WINDOW = 20


@dataclass(frozen=True)
class DemoExample:
    task: str
    index: int  # position in the task's test split
    prompt: str
    refs: tuple[str, ...]
    metric: str  # "em" or "rougeL"
    max_tokens: int


def choose_examples() -> list[DemoExample]:
    """The fixed rule: per pool task, the shortest prompt among the first DEMO_WINDOW test examples
    whose prompt the adapter was not trained on."""
    from .tasks import POOL_TASKS, splits

    chosen = []
    for task in POOL_TASKS:
        sp = splits(task)
        test, trained = sp["test"], {e.prompt for e in sp["train"]}
        unseen = [j for j in range(min(DEMO_WINDOW, len(test))) if test[j].prompt not in trained]
        i = min(unseen, key=lambda j: (len(test[j].prompt), j))
        ex = test[i]
        chosen.append(DemoExample(task.name, i, ex.prompt, tuple(ex.refs), task.metric, task.max_tokens))
    return chosen


def load_examples(path: Path = EXAMPLES_FILE) -> list[DemoExample]:
    data = json.loads(path.read_text())
    return [DemoExample(**{**d, "refs": tuple(d["refs"])}) for d in data["examples"]]


def write_examples(path: Path = EXAMPLES_FILE) -> Path:
    doc = {"rule": f"per pool task, the shortest prompt among the first {DEMO_WINDOW} examples of its test split "
                   "(logo_edge.tasks.splits: seeded shuffle, test first) whose prompt is not in the training split; "
                   "the first on ties",
           "examples": [asdict(e) for e in choose_examples()]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def _score(ex: DemoExample, text: str) -> float:
    from .tasks import METRICS

    return METRICS[ex.metric](text, ex.refs)


def _indent(text: str) -> str:
    lines = [ln.rstrip() for ln in text.strip().splitlines() if ln.strip()]
    return "\n             ".join(lines) or "(empty)"


def run_demo(args) -> int:
    from .cli import _engine

    examples = load_examples()
    with _engine(args) as eng:
        if len(eng.pool) == 0:
            print("no adapters: pass --adapters DIR, or reinstall logo-edge for its shipped pool")
            return 1
        print(f"model {eng.model.path.name} (SmolLM2-135M-Instruct: a 135M-parameter model, small enough for any "
              f"laptop; its answers are short and often wrong, what matters here is the difference routing makes)")
        print(f"pool of {len(eng.pool)} adapters: {', '.join(eng.pool.names)}")
        print(f"routing: signal={eng.routing.signal}, k={eng.routing.k}, blocks {eng.pool.blocks[0]}-"
              f"{eng.pool.blocks[-1]}, calibration={eng.routing.calibration}")
        print(f"{len(examples)} held-out test examples, one per task, chosen by a fixed rule (none was trained on)\n")
        tally = {"better": 0, "same": 0, "worse": 0, "own_first": 0, "base": 0.0, "routed": 0.0}
        for n, ex in enumerate(examples, 1):
            messages = [{"role": "user", "content": ex.prompt}]
            max_tokens = min(ex.max_tokens, args.max_tokens)
            base = eng.create_chat_completion(messages, adapters="base", max_tokens=max_tokens)
            routed = eng.create_chat_completion(messages, max_tokens=max_tokens)
            b_text = base["choices"][0]["message"]["content"]
            r_text = routed["choices"][0]["message"]["content"]
            sb, sr = _score(ex, b_text), _score(ex, r_text)
            chosen = sorted((a for a in routed["routing"]["adapters"] if a["rank"] is not None),
                            key=lambda a: a["rank"])
            tally["better" if sr > sb else "worse" if sr < sb else "same"] += 1
            tally["own_first"] += bool(chosen) and chosen[0]["name"] == ex.task
            tally["base"] += sb
            tally["routed"] += sr
            metric = "exact match" if ex.metric == "em" else "ROUGE-L"
            print(f"[{n}/{len(examples)}] task {ex.task} (test example {ex.index}, scored by {metric})")
            print(f"> {_indent(ex.prompt)}")
            print(f"  reference: {_indent(ex.refs[0])}")
            print(f"  base:      {_indent(b_text)}   [{sb:.2f}]")
            print(f"  routed:    {_indent(r_text)}   [{sr:.2f}]")
            print("  adapters:  " + ", ".join(f"{a['name']} {a['weight']:.2f}" for a in chosen) + "\n")
        k = len(examples)
        print(f"tally: routed better than base on {tally['better']} of {k}, the same on {tally['same']}, "
              f"worse on {tally['worse']}; mean score {tally['routed'] / k:.2f} routed vs {tally['base'] / k:.2f} "
              f"base; the task's own adapter ranked first on {tally['own_first']} of {k}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-examples", action="store_true", help="regenerate data/demo_examples.json")
    args = ap.parse_args(argv)
    if args.write_examples:
        print(write_examples())
        return 0
    ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
