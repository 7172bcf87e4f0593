"""`logo-edge demo`: route a handful of mixed prompts on the shipped pool, print the choices and answers."""

from __future__ import annotations

# Mixed requests, written for the demo in the styles of the shipped pool's tasks (none is a test example).
DEMO_PROMPTS = [
    "Is the opinion in this sentence positive, negative, neutral or ambivalent?\n\nThe battery died after two "
    "days and support never answered.\n\nOptions: positive, negative, neutral, ambivalent",
    "Compute the answer. Reply with the number only.\n\nWhat is 482 plus 317?",
    "Write a SQL query that answers the question on a database with the given columns.\n\nHow many singers "
    "are older than 30? | concert_singer | singer : singer_id, name, country, age",
    "Describe the restaurant in one sentence from its attributes.\n\nname: The Olive Tree, eatType: "
    "restaurant, food: Italian, priceRange: moderate, area: city centre, familyFriendly: yes",
    "Which language is this sentence in? Answer with one of the options.\n\nDer Hund schläft im Garten.\n\n"
    "Options: German, Dutch, Swedish, Danish",
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
              f"blocks {eng.pool.blocks[0]}-{eng.pool.blocks[-1]}, {eng.pool.target_module}, "
              f"calibration={eng.routing.calibration}\n")
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
