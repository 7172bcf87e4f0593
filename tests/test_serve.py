"""The server, live on loopback: the real openai client, plain HTTP for errors, isolation under load, a live pool."""

import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from live_server import live_server

pytestmark = pytest.mark.slow
ADAPTERS = ["qv_r8", "all7_r4", "rs_r16", "qkd_r2", "pattern_r8"]
N_CTX = 512


@pytest.fixture(scope="module")
def pool_dir(tiny, tmp_path_factory):
    """A directory of the tiny adapters (the server may load from it), plus one outside it."""
    d = tmp_path_factory.mktemp("pool")
    for name in ADAPTERS:
        shutil.copy(tiny / "gguf" / f"{name}.gguf", d / f"{name}.gguf")
    return d


@pytest.fixture(scope="module")
def server(tiny, pool_dir, tmp_path_factory):
    extra = tmp_path_factory.mktemp("extra")
    shutil.copy(tiny / "gguf" / "qv_r8.gguf", extra / "hot.gguf")
    shutil.copytree(tiny / "peft" / "qv_r8", extra / "peft_qv")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copy(tiny / "gguf" / "qv_r8.gguf", outside / "secret.gguf")
    (extra / "escape.gguf").symlink_to(outside / "secret.gguf")
    log = tmp_path_factory.mktemp("log") / "server.log"
    with live_server("--model", str(tiny / "tiny-f32.gguf"), "--adapters", str(pool_dir), "--adapter-dir", str(extra),
                     "--n-ctx", str(N_CTX), "--parallel", "2", "--max-tokens-limit", "64", "--max-body-kb", "64",
                     "--model-name", "tiny", log=log) as url:
        yield {"url": url, "extra": extra, "outside": outside, "log": log}


def _client(url, key="none"):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


# ---- the openai client


def test_openai_client_chat_completion_and_routing_record(server):
    client = _client(server["url"])
    resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello there"}],
                                          max_tokens=6, temperature=0)
    assert resp.choices[0].message.content and resp.usage.completion_tokens > 0
    rec = resp.model_extra["routing"]
    assert rec["mode"] == "routed" and {a["name"] for a in rec["adapters"]} == set(ADAPTERS)
    assert sum(a["rank"] is not None for a in rec["adapters"]) == 3  # the default k
    assert resp.model == "tiny"

    text = client.completions.create(model="tiny", prompt="one two three", max_tokens=5)
    assert text.choices[0].text is not None and text.model_extra["routing"]["mode"] == "routed"


def test_openai_client_streams_with_the_record_on_the_last_chunk(server):
    client = _client(server["url"])
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_extra["routing"]["mode"] == "routed" and chunks[-1].usage.completion_tokens > 0
    assert all("routing" not in (c.model_extra or {}) for c in chunks[:-1])
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    assert streamed == whole.choices[0].message.content  # one generator serves both


def test_per_request_control_in_the_ecosystems_shapes(server):
    client = _client(server["url"])
    msg = [{"role": "user", "content": "count with me"}]

    def ask(**kw):
        r = client.chat.completions.create(messages=msg, max_tokens=6, **kw)
        rec = r.model_extra["routing"]
        return r.choices[0].message.content, rec, {a["name"]: a["weight"] for a in rec["adapters"] if a["rank"]}

    by_name = ask(model="tiny", extra_body={"lora": [{"name": "rs_r16", "scale": 0.6}, {"id": 0, "scale": 0.4}]})
    first = sorted(ADAPTERS)[0]  # ids are positions in /lora-adapters: a directory loads in name order
    assert by_name[1]["mode"] == "manual" and by_name[2] == {"rs_r16": 0.6, first: 0.4}
    base = ask(model="tiny", extra_body={"lora": []})
    assert base[1]["mode"] == "base" and base[2] == {}
    alone = ask(model="all7_r4")  # vLLM: an adapter's name as the model
    assert alone[2] == {"all7_r4": 1.0}
    assert ask(model="tiny", extra_body={"lora": [{"name": "all7_r4", "scale": 1.0}]})[0] == alone[0]
    k1 = ask(model="tiny", extra_body={"logo": {"k": 1, "signal": "entropy"}})
    assert k1[1]["settings"]["k"] == 1 and k1[1]["settings"]["signal"] == "entropy" and len(k1[2]) == 1


def test_models_and_adapters_are_listed(server):
    models = httpx.get(server["url"] + "/v1/models").json()["data"]
    assert models[0]["id"] == "tiny" and models[0]["parent"] is None
    assert [m["id"] for m in models[1:]] == sorted(ADAPTERS) and all(m["parent"] == "tiny" for m in models[1:])
    listed = httpx.get(server["url"] + "/lora-adapters").json()
    assert [a["id"] for a in listed] == list(range(len(ADAPTERS)))
    assert {a["name"]: a["rank"] for a in listed}["rs_r16"] == 16 and all(a["probeable"] for a in listed)
    pool = httpx.get(server["url"] + "/v1/pool").json()["data"]  # the rows of `logo-edge pool list`
    assert [p["name"] for p in pool] == [a["name"] for a in listed]
    assert {p["name"]: (p["rank"], p["probeable"]) for p in pool} == {a["name"]: (a["rank"], True) for a in listed}


# ---- errors: each a 4xx naming the problem, and the server keeps serving


@pytest.mark.parametrize("body, status, says", [
    (b'{"messages": [', 400, "malformed JSON"),
    ({"messages": [{"role": "user", "content": "x"}], "lora": [{"name": "nope", "scale": 1}]}, 400, "'nope'"),
    ({"messages": [{"role": "user", "content": "x"}], "lora": [{"id": 99, "scale": 1}]}, 400, "lora id 99"),
    ({"messages": [{"role": "user", "content": "x"}], "lora": [{"name": "qv_r8", "scale": 1e9}]}, 400, "scale"),
    (b'{"messages": [{"role": "user", "content": "x"}], "lora": [{"name": "qv_r8", "scale": NaN}]}', 400, "scale"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404, "'gpt-9' does not exist"),
    ({"messages": [{"role": "user", "content": "x"}], "logo": {"k": 0}}, 400, "k"),
    ({"messages": [{"role": "user", "content": "x"}], "logo": {"signal": "vibes"}}, 400, "vibes"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "n=3"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": []}, 400, "unsupported field `tools`"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, 400, "max_tokens=100000"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, 400, "temperature"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["x"] * 17}, 400, "at most 16 stop strings"),
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "but the context holds 512"),
])
def test_bad_requests_are_4xx_naming_the_problem(server, body, status, says):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server["url"] + "/v1/chat/completions", content=data, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"], r.text
    ok = httpx.post(server["url"] + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                 "max_tokens": 2})
    assert ok.status_code == 200  # still serving


def test_oversize_body_is_413(server):
    big = {"messages": [{"role": "user", "content": "x" * (70 * 1024)}]}
    r = httpx.post(server["url"] + "/v1/chat/completions", json=big)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the limit holds while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(80):
            yield b"y" * 1024
        yield b'"}]}'

    r = httpx.post(server["url"] + "/v1/chat/completions", content=chunked(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_api_key_is_checked_everywhere_but_health(tiny):
    with live_server("--model", str(tiny / "tiny-f32.gguf"), "--adapters", str(tiny / "gguf" / "qv_r8.gguf"),
                     "--n-ctx", "256", env={"LOGO_EDGE_API_KEY": "sekret"}) as url:
        assert httpx.get(url + "/health").status_code == 200
        for path in ("/v1/models", "/lora-adapters", "/v1/pool"):
            r = httpx.get(url + path)
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        import openai

        with pytest.raises(openai.AuthenticationError):
            _client(url, "wrong").models.list()
        assert _client(url, "sekret").models.list().data[0].id == "tiny-f32"


def test_a_stream_left_early_frees_its_engine_for_the_next_request():
    """The workers' side of a client leaving mid-stream: a generation that would never end on its own stops at
    the next chunk once its consumer is gone, so the engine serves the next request (without the cancel flag
    that call would wait forever)."""
    import asyncio
    import itertools

    from logo_edge.serve.workers import Workers

    class Engine:
        def close(self):
            pass

    def endless(_engine):
        for i in itertools.count():
            time.sleep(0.005)
            yield i

    async def scenario(workers):
        chunks = workers.stream(endless)
        assert await chunks.__anext__() == 0
        await chunks.aclose()  # what the SSE response does when its client leaves
        return await asyncio.wait_for(workers.call(lambda _engine: "served"), timeout=10)

    workers = Workers(Engine, 1)
    try:
        assert asyncio.run(scenario(workers)) == "served"
    finally:
        workers.close()


def test_a_client_that_leaves_mid_stream_leaves_the_server_serving(server):
    # (the tiny model's 64 tokens take milliseconds: what frees the engine is tested on the workers above)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 64, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first chunk
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as ex:  # both engines answer at once: neither is stuck on the abandoned stream
        outs = list(ex.map(lambda _: httpx.post(server["url"] + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code, range(4)))
    assert outs == [200] * 4 and time.monotonic() - t0 < 30


# ---- the live pool


def test_load_use_and_unload_an_adapter_without_restart(server):
    url, extra = server["url"], server["extra"]
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": str(extra / "hot.gguf")})
    assert r.status_code == 200 and r.json()["probeable"], r.text
    assert "hot" in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    same = [httpx.post(url + "/v1/chat/completions", json={"model": m, "messages": [{"role": "user", "content": "a b"}],
                                                           "max_tokens": 6}).json() for m in ("hot", "qv_r8")]
    assert same[0]["choices"][0]["message"]["content"] == same[1]["choices"][0]["message"]["content"]
    routed = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "a b"}],
                                                            "max_tokens": 2, "logo": {"k": 6}}).json()
    assert "hot" in {a["name"] for a in routed["routing"]["adapters"] if a["rank"]}  # routable at once
    listed = {a["name"]: a["id"] for a in httpx.get(url + "/lora-adapters").json()}
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "hot"})
    assert r.status_code == 200
    r = httpx.post(url + "/v1/chat/completions", json={"model": "hot", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404
    # ids stay with their adapters: the unloaded one's is refused, not given to the adapter after it
    assert {a["name"]: a["id"] for a in httpx.get(url + "/lora-adapters").json()} == {
        n: i for n, i in listed.items() if n != "hot"}
    gone = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
            "lora": [{"id": listed["hot"], "scale": 1}]}
    by_id = httpx.post(url + "/v1/chat/completions", json=gone)
    assert by_id.status_code == 400 and f"lora id {listed['hot']} is not loaded" in by_id.text
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "hot"}).status_code == 404


def test_a_peft_directory_is_converted_on_load(server):
    url = server["url"]
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "peft_qv", "lora_path": "peft_qv"}, timeout=120)
    assert r.status_code == 200 and r.json()["lora_path"].endswith(".gguf"), r.text
    out = httpx.post(url + "/v1/chat/completions", json={"model": "peft_qv", "max_tokens": 3,
                                                         "messages": [{"role": "user", "content": "x"}]})
    assert out.status_code == 200 and out.json()["routing"]["mode"] == "manual"
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "peft_qv"}).status_code == 200


@pytest.mark.parametrize("path, status, says", [
    ("../outside/secret.gguf", 400, "'..'"),
    ("escape.gguf", 403, "outside the adapter directories"),
    ("missing.gguf", 404, "does not exist"),
])
def test_load_paths_are_confined(server, path, status, says):
    r = httpx.post(server["url"] + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
    assert r.status_code == status and says in r.json()["error"]["message"], r.text


def test_load_refuses_absolute_paths_outside_and_bad_files(server, tmp_path):
    url = server["url"]
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x",
                                                        "lora_path": str(server["outside"] / "secret.gguf")})
    assert r.status_code == 403
    (server["extra"] / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "junk", "lora_path": "junk.gguf"})
    assert r.status_code == 400 and "junk.gguf" in r.json()["error"]["message"]
    assert "junk" not in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "qv_r8", "lora_path": "hot.gguf"})
    assert r.status_code == 400 and "already served" in r.json()["error"]["message"]
    bad = server["extra"] / "bad_peft"  # a PEFT directory without weights: the client's fault, named
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "bad_peft", "lora_path": "bad_peft"})
    assert r.status_code == 400 and "bad_peft" in r.json()["error"]["message"], r.text


def test_two_loads_of_one_name_at_once_leave_one_adapter_served(server):
    """Both pass the early name check; the second, inside the writer section, is refused and rolls back nothing
    of the first's (its rollback used to remove the adapter the first had just added)."""
    url, extra = server["url"], server["extra"]
    shutil.copy(extra / "hot.gguf", extra / "hot2.gguf")
    start = threading.Barrier(2)

    def load(path):
        start.wait()
        return httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "race", "lora_path": path}, timeout=60)

    with ThreadPoolExecutor(2) as ex:
        got = sorted(r.status_code for r in ex.map(load, ["hot.gguf", "hot2.gguf"]))
    assert got == [200, 400]
    assert "race" in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    out = httpx.post(url + "/v1/chat/completions", json={"model": "race", "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": "x"}]})
    assert out.status_code == 200, out.text  # served on every engine
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "race"}).status_code == 200


# ---- isolation under load, and the pool changing under load


def _mixtures():
    """22 request shapes: routed (k, signal, calibration, probe input, probe-cache), by hand (pairs, scales),
    single adapters, packed, base."""
    out = [{"logo": {"k": k}} for k in (1, 2, 3)] + [{"logo": {"k": 2, "signal": "entropy"}},
                                                     {"logo": {"k": 2, "calibration": "raw"}},
                                                     {"logo": {"k": 2, "probe_input": "residual"}},
                                                     {"logo": {"k": 1, "prefill": "probe-cache"}}]
    for i, a in enumerate(ADAPTERS):
        b = ADAPTERS[(i + 1) % len(ADAPTERS)]
        out.append({"lora": [{"name": a, "scale": 0.7}, {"name": b, "scale": 0.3}]})
        out.append({"lora": [{"name": a, "scale": 1.0}]})
    out += [{"model": "rs_r16"}, {"lora": []}, {"lora": [{"name": "qv_r8", "scale": -0.5}]},
            {"lora": [{"name": "all7_r4", "scale": 0.5}, {"name": "rs_r16", "scale": 0.5}],
             "logo": {"merge": "packed"}},
            {"lora": [{"name": "rs_r16", "scale": 2.0}]}]  # (fusion needs equal shapes: none here)
    return out


PROMPTS = ["the river and the market", "proof of energy", "a letter to the harbor", "signal theory number"]


def _references(tiny, mixture, prompts) -> list[dict]:
    """The same requests alone: a fresh engine with the server's settings per mixture, nothing cached
    between prompts (each response, with its routing record)."""
    from logo_edge.engine import Engine

    kw = _kwargs(mixture)
    out = []
    with Engine(tiny / "tiny-f32.gguf", [tiny / "gguf" / f"{n}.gguf" for n in ADAPTERS], n_ctx=N_CTX) as eng:
        for prompt in prompts:
            eng.forget_prompts()
            r = eng.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=8, **kw)
            out.append(r)
    return out


TIE = 1e-2  # logits (up to 5 in this random model; a flip seen in CI: 4e-4 apart) this close are a near-tie


def _selected(routing: dict) -> dict[str, float]:
    return {a["name"]: a["weight"] for a in routing["adapters"] if a["rank"] is not None}


def _check_split(eng, msgs, shape, answer, cached, served, alone) -> None:
    """An answer that differs from the same request alone (`alone`: its routing record).

    llama.cpp's kernels depend on the batch: K/V reused from an earlier request were computed in a batch of
    another size, which changes their last bits and can flip a near-tie of this random model's logits or routing
    scores. So a different answer is allowed only with K/V reused (`cached`), under the mixture the request alone
    chose (or at a near-tie of its scores), and only where each of its tokens is within TIE of the best logit of
    the request alone fed the answer so far: one wrong adapter, scale or K/V row moves logits far more."""
    assert cached > 0, ("differs with nothing cached", shape, msgs, answer)
    mine, theirs = _selected(served), _selected(alone)
    if mine.keys() != theirs.keys():
        scores = sorted((a["score"] for a in alone["adapters"] if a["score"] is not None), reverse=True)
        k = len(theirs)
        assert 0 < k < len(scores) and scores[k - 1] - scores[k] < TIE, (shape, msgs, mine, theirs, scores)
        return
    assert all(abs(mine[n] - theirs[n]) < TIE for n in mine), (shape, msgs, mine, theirs)
    eng.forget_prompts()
    eng.create_chat_completion(msgs, max_tokens=1, **_kwargs(shape))  # routed and prefilled as alone
    pos, want, gaps = len(eng._cache), answer.encode(), []
    try:
        for _ in range(8):
            logits = eng.ctx.logits()
            near = sorted((int(t) for t in np.flatnonzero(logits >= logits.max() - TIE)), key=lambda t: -logits[t])
            if not want and any(eng.model.is_eog(t) for t in near):
                break  # the served answer ended here
            nxt = [t for t in near if not eng.model.is_eog(t) and want.startswith(eng.model.token_bytes(t))]
            assert nxt, (shape, msgs, answer, "left the request alone's path where no near-tie allows it")
            gaps.append(float(logits.max() - logits[nxt[0]]))
            want = want[len(eng.model.token_bytes(nxt[0])):]
            if not want:
                break
            eng.ctx.decode([nxt[0]], pos, what="decode")
            pos += 1
    finally:
        eng.forget_prompts()
    print(f"answer at a near-tie ({cached} cached): largest gap to the best logit {max(gaps, default=0):.2g}")


def test_isolation_under_load_every_answer_equals_the_request_alone(server, tiny):
    mixtures = _mixtures()
    assert len(mixtures) >= 20
    jobs = [(i % len(mixtures), (i // len(mixtures)) % len(PROMPTS)) for i in range(440)]
    import random

    random.Random(0).shuffle(jobs)

    def ask(job):
        m, p = job
        body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[p]}], "max_tokens": 8,
                **mixtures[m]}
        r = httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=120)
        return job, r.status_code, r.json()

    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as ex:  # 8 concurrent clients over 2 engines
        results = list(ex.map(ask, jobs))
    print(f"{len(jobs)} requests, 8 clients, 2 engines: {time.monotonic() - t0:.1f} s")
    assert [s for _, s, _ in results] == [200] * len(jobs), [b for _, s, b in results if s != 200][:3]
    refs = {m: _references(tiny, mix, PROMPTS) for m, mix in enumerate(mixtures)}
    split = [(m, p, body) for (m, p), _, body in results
             if body["choices"][0]["message"]["content"] != refs[m][p]["choices"][0]["message"]["content"]]
    if split:
        from logo_edge.engine import Engine

        with Engine(tiny / "tiny-f32.gguf", [tiny / "gguf" / f"{n}.gguf" for n in ADAPTERS], n_ctx=N_CTX,
                    n_threads=max(1, (os.cpu_count() or 1) // 2)) as eng:
            for m, p, body in split:
                _check_split(eng, [{"role": "user", "content": PROMPTS[p]}], mixtures[m],
                             body["choices"][0]["message"]["content"], body["routing"]["timings"]["cached_tokens"],
                             body["routing"], refs[m][p]["routing"])
    assert len(split) <= 10  # a rare near-tie, not a pattern
    assert len({m for (m, _), _, _ in results}) >= 20


def _kwargs(mixture: dict) -> dict:
    kw = dict(mixture.get("logo", {}))
    if "lora" in mixture:
        kw["adapters"] = {x["name"]: x["scale"] for x in mixture["lora"]} or "base"
    elif "model" in mixture:
        kw["adapters"] = {mixture["model"]: 1.0}
    return kw


@pytest.mark.slow
def test_isolation_of_a_thousand_requests_with_chats_that_switch_mixtures(server, tiny):
    """1,020 requests: 720 single turns over the 22 request shapes, and 100 three-turn chats whose every turn
    takes another shape (routed, by hand, packed, base; the history carries the server's own earlier answers),
    8 clients over 2 engines. Each answer equals the same request run alone (an engine with nothing cached)."""
    import random

    from logo_edge.engine import Engine

    mixtures = [m for m in _mixtures() if m.get("logo", {}).get("prefill") != "probe-cache"]  # exact ones in chats
    every = _mixtures()
    rng = random.Random(1)
    singles = [("one", [(rng.randrange(len(every)), rng.randrange(len(PROMPTS)))]) for _ in range(720)]
    chats = [("chat", [(rng.randrange(len(mixtures)), rng.randrange(len(PROMPTS))) for _ in range(3)])
             for _ in range(100)]
    jobs = singles + chats
    rng.shuffle(jobs)

    def ask(job):
        kind, turns = job
        shapes = every if kind == "one" else mixtures
        msgs, out = [], []
        for m, p in turns:
            msgs = msgs + [{"role": "user", "content": PROMPTS[p]}]
            body = {"model": "tiny", "messages": msgs, "max_tokens": 8, **shapes[m]}
            # a turn kept on the mixture's own states (the default keep_probe) answers under the previous turn's
            # mixture and reuses its K/V, by design (exact under that mixture: test_engine); an engine with nothing
            # cached routes afresh. Here every turn is decided on the base probe, whose keep needs half the prompt
            # cached and rarely holds on these short prompts: the answers are compared with the request alone.
            body["logo"] = {**body.get("logo", {}), "keep_probe": "base"}
            r = httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            answer = r.json()["choices"][0]["message"]["content"]
            routing = r.json()["routing"]
            # K/V reused: the answer's, or the probe's (its base-model K/V of the history: h's last bits, so a
            # near-tie of the routing scores, depend on the batches they were computed in)
            reused = routing["timings"]["cached_tokens"] + (routing["timings"].get("probe_cached_tokens") or 0)
            out.append((list(msgs), shapes[m], answer, reused, routing))
            msgs = msgs + [{"role": "assistant", "content": answer}]
        return out

    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as ex:
        results = [turn for job in ex.map(ask, jobs) for turn in job]
    elapsed = time.monotonic() - t0
    assert len(results) == 1020
    switches = sum(1 for _, turns in chats for a, b in zip(turns, turns[1:]) if a[0] != b[0])
    print(f"{len(results)} requests ({len(chats)} chats, {switches} mixture switches inside them), 8 clients, "
          f"2 engines: {elapsed:.1f} s")
    assert switches >= 150
    # the server's engines run on cpu_count // 2 threads each (--parallel 2): so does this one, like with like
    with Engine(tiny / "tiny-f32.gguf", [tiny / "gguf" / f"{n}.gguf" for n in ADAPTERS], n_ctx=N_CTX,
                n_threads=max(1, (os.cpu_count() or 1) // 2)) as eng:
        alone, split = {}, 0
        for msgs, shape, answer, cached, served in results:
            key = (repr(msgs), repr(shape))
            if key not in alone:
                eng.forget_prompts()
                alone[key] = eng.create_chat_completion(msgs, max_tokens=8, **_kwargs(shape))
            mixed = served.get("mode") == "routed" and _selected(served) != _selected(alone[key]["routing"])
            if answer != alone[key]["choices"][0]["message"]["content"] and (
                    mixed or served["settings"].get("mixture") in ("kept", "returned")):
                # answered under another mixture than the request alone's: one its conversation had (routed within
                # `keep` of it; "returned": its K/V kept per mixture came back), or routed from a probe whose reused
                # K/V moved the weights' last bits. Exact under that mixture: compared with it set by hand
                merge = {k: v for k, v in shape.get("logo", {}).items() if k == "merge"}
                shape = {"lora": [{"name": n, "scale": w} for n, w in _selected(served).items()], "logo": merge}
                served = {"adapters": [{"name": n, "weight": w, "rank": 1} for n, w in _selected(served).items()]}
                key = (repr(msgs), repr(shape))
                if key not in alone:
                    eng.forget_prompts()
                    alone[key] = eng.create_chat_completion(msgs, max_tokens=8, **_kwargs(shape))
            if answer != alone[key]["choices"][0]["message"]["content"]:
                split += 1
                _check_split(eng, msgs, shape, answer, cached, served, alone[key]["routing"])
        assert split <= 10  # a rare near-tie, not a pattern


def test_adapters_added_and_removed_under_load(server):
    url = server["url"]
    stop = threading.Event()
    absent: list[tuple[float, float]] = []  # windows in which "hot" was certainly not in the pool
    changes = {"load": 0, "unload": 0}

    def churn():
        while not stop.is_set():
            t_load = time.monotonic()
            if absent:
                absent[-1] = (absent[-1][0], t_load)
            r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": "hot.gguf"},
                           timeout=60)
            assert r.status_code == 200, r.text
            changes["load"] += 1
            time.sleep(0.05)
            r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "hot"}, timeout=60)
            assert r.status_code == 200, r.text
            changes["unload"] += 1
            absent.append((time.monotonic(), float("inf")))
            time.sleep(0.05)

    def ask(i):
        body = {"messages": [{"role": "user", "content": PROMPTS[i % 4]}], "max_tokens": 4,
                **([{"logo": {"k": 6}}, {"lora": [{"name": "qv_r8", "scale": 1.0}]}][i % 2])}
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        chosen = {a["name"] for a in r.json().get("routing", {}).get("adapters", []) if a["rank"]}
        return t0, time.monotonic(), r.status_code, chosen

    t = threading.Thread(target=churn)
    t.start()
    try:
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(ask, range(160)))
    finally:
        stop.set()
        t.join(60)
    assert changes["load"] >= 3 and changes["unload"] >= 3
    assert all(s == 200 for _, _, s, _ in results)
    for t0, t1, _, chosen in results:  # a request made wholly while "hot" was gone never used it
        if any(a <= t0 and t1 <= b for a, b in absent):
            assert "hot" not in chosen
    assert any("hot" in chosen for *_, chosen in results)  # and it was routed to while loaded


def test_chat_command_talks_to_a_running_server(server):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "logo_edge.cli", "chat", "--server", server["url"], "--max-tokens", "5"]
    res = subprocess.run(cmd, input="hello there\nand again\n\n", capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("[routed: ") == 2, res.stderr  # each turn says who answered
    for flags, mode in ((["--use", "qv_r8=1"], "[manual: "), (["--base"], "[base")):  # sent as `lora`, not dropped
        res = subprocess.run(cmd + flags + ["--system", "be brief"], input="hello there\n\n", capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0 and mode in res.stderr, res.stderr


def test_split_check_passes_the_answer_alone_and_rejects_another_adapters(tiny):
    """The check behind the isolation tests cannot pass everything: the answer alone passes it (and so would one
    that leaves at a near-tie), an answer under another adapter, or the same one at another scale, fails it."""
    from logo_edge.engine import Engine

    msgs = [{"role": "user", "content": PROMPTS[1]}]
    shape = {"lora": [{"name": "qv_r8", "scale": 1.0}]}
    with Engine(tiny / "tiny-f32.gguf", [tiny / "gguf" / f"{n}.gguf" for n in ADAPTERS], n_ctx=N_CTX) as eng:
        alone = eng.create_chat_completion(msgs, max_tokens=8, **_kwargs(shape))
        answer = alone["choices"][0]["message"]["content"]
        _check_split(eng, msgs, shape, answer, 5, alone["routing"], alone["routing"])
        for other in ({"lora": [{"name": "all7_r4", "scale": 1.0}]}, {"lora": [{"name": "qv_r8", "scale": 0.9}]}):
            eng.forget_prompts()
            wrong = eng.create_chat_completion(msgs, max_tokens=8, **_kwargs(other))["choices"][0]["message"]
            assert wrong["content"] != answer
            with pytest.raises(AssertionError, match="no near-tie"):
                _check_split(eng, msgs, shape, wrong["content"], 5, alone["routing"], alone["routing"])
        with pytest.raises(AssertionError, match="nothing cached"):
            _check_split(eng, msgs, shape, answer + "x", 0, alone["routing"], alone["routing"])


def test_an_errors_own_status_is_served():
    """FleetError says 502 (a backend failed); the catch-all for LogoEdgeError (500) must not shadow it."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from logo_edge.serve.app import _install_errors
    from logo_edge.serve.fleet import FleetError

    app = FastAPI()
    _install_errors(app)

    @app.get("/x")
    def x():
        raise FleetError("llama-server at http://127.0.0.1:1 answered 500")

    r = TestClient(app, raise_server_exceptions=False).get("/x")
    assert r.status_code == 502 and r.json()["error"]["code"] == "backend_error", r.text
