"""`logo-edge demo`: route a handful of mixed prompts on the shipped pool, print the choices and answers."""

from __future__ import annotations

DEMO_PROMPTS = [
    "Classify the sentiment of this review: 'The battery died after two days and support never answered.'",
    "Claim: The Eiffel Tower is in Berlin. Evidence: The Eiffel Tower is a landmark in Paris. "
    "Does the evidence support or refute the claim?",
    "Sam has 3 boxes with 4 apples each and eats 2 apples. How many apples are left?",
    "Write an SQL query that lists the names of all singers older than 30 from the table singer.",
    "Is the following statement true or false? not ( True and False ) or False",
]


def run_demo(args) -> int:
    from .cli import _engine

    with _engine(args) as eng:
        if len(eng.pool) == 0:
            print("no adapters: pass --adapters DIR (the shipped pool lives in models/pool)")
            return 1
        print(f"model {eng.model.path.name}; pool of {len(eng.pool)} adapters: {', '.join(eng.pool.names)}")
        print(f"routing: signal={eng.routing.signal}, k={eng.routing.k}, probe input={eng.routing.probe_input}, "
              f"block {eng.pool.target_block}, {eng.pool.target_module}\n")
        for prompt in DEMO_PROMPTS:
            out = eng.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=args.max_tokens)
            rec = out["routing"]
            chosen = sorted((a for a in rec["adapters"] if a["rank"] is not None), key=lambda a: a["rank"])
            t = rec["timings"]
            print(f"> {prompt}")
            print("  adapters: " + ", ".join(f"{a['name']} ({a['weight']:.2f})" for a in chosen))
            print("  answer:   " + out["choices"][0]["message"]["content"].strip().replace("\n", "\n            "))
            print(f"  time:     probe {t['probe_s'] * 1e3:.0f} ms, prefill {t['prefill_s'] * 1e3:.0f} ms, "
                  f"decode {t['completion_tokens']} tokens at {t['decode_tok_s']:.0f} tok/s\n")
    return 0
