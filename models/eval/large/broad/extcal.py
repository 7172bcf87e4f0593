"""Task-like calibration prompts from BIG-bench tasks that share no top-level task with any task logo-edge
evaluates (pool, large pool, unseen): `n` seeded examples each, input <= 500 characters, options appended."""
from __future__ import annotations

import json
import random
import re
import sys
import tarfile

from study import HERE

from logo_edge.tasks import TASKS, UNSEEN_TASKS, bigbench_archive

PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def excluded() -> set[str]:
    return {t.source.split("/")[0] for t in [*TASKS.values(), *UNSEEN_TASKS]}


def prompts(n: int = 2, max_chars: int = 500, seed: int = 0) -> list[dict]:
    skip = excluded()
    out = []
    with tarfile.open(bigbench_archive()) as tar:
        for member in tar:
            if not (member.name.startswith(PREFIX) and member.name.endswith("/task.json")):
                continue
            source = member.name[len(PREFIX):-len("/task.json")]
            if source.split("/")[0] in skip:
                continue
            try:
                task = json.loads(tar.extractfile(member).read())
            except (ValueError, UnicodeDecodeError):
                continue
            exs = [e for e in task.get("examples", []) if isinstance(e.get("input"), str)
                   and 0 < len(e["input"].strip()) <= max_chars]
            if not exs:
                continue
            for e in random.Random(f"{seed}/{source}").sample(exs, min(n, len(exs))):
                text = re.sub(r"\s+\n", "\n", e["input"].strip())
                if isinstance(e.get("target_scores"), dict) and 1 < len(e["target_scores"]) <= 8:
                    text += "\n\nOptions: " + ", ".join(e["target_scores"])
                out.append({"source": source, "prompt": text})
    return out


if __name__ == "__main__":
    got = prompts(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    print(len(got), "prompts from", len({g["source"] for g in got}), "tasks", file=sys.stderr)
    (HERE / "extcal.json").write_text(json.dumps(got, indent=0))
