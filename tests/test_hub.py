"""`logo-edge pull` offline: a Hugging Face cache built here (blobs, snapshots, refs) with the tiny model's
adapters, read by huggingface_hub itself with HF_HUB_OFFLINE=1; nothing reaches the Hub.

huggingface_hub reads its environment once, at import, into `huggingface_hub.constants`: in this process
the `offline_hub` fixture sets the variables and those constants alike; the CLI test starts a fresh
process with the variables alone, as a user's shell would.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from logo_edge import hub
from logo_edge.convert.lora import convert_lora
from logo_edge.errors import AdapterError, ConversionError
from logo_edge.gguf_files import tensor_array
from logo_edge.pool_ops import read_manifest

BASE_REPO = "test-org/tiny-llama"  # the Hub id the tiny base answers to in these tests
CARD = "---\nbase_model: {base}\nlibrary_name: peft\ntags:\n- lora\n---\n\n# {name}\n"


class HubCache:
    """A Hugging Face hub cache as huggingface_hub writes it: blobs/<sha256>, snapshots/<commit>/<path> as
    relative symlinks to the blobs, refs/<branch or tag> holding the commit."""

    def __init__(self, root: Path):
        self.root = root

    def add(self, repo_id: str, files: dict, refs=("main",)) -> str:
        """files: repo path -> bytes or a file to copy; returns the (made-up, content-derived) commit."""
        data = {p: v if isinstance(v, bytes) else Path(v).read_bytes() for p, v in files.items()}
        commit = hashlib.sha1(repr(sorted((p, hashlib.sha256(b).hexdigest()) for p, b in data.items()))
                              .encode()).hexdigest()
        repo = self.root / ("models--" + repo_id.replace("/", "--"))
        for path, content in data.items():
            blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(content)
            link = repo / "snapshots" / commit / path
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        for ref in refs:
            (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
            (repo / "refs" / ref).write_text(commit)
        return commit

    def add_peft(self, repo_id: str, peft_dir: Path, base=BASE_REPO, card_base=BASE_REPO, refs=("main",), **cfg):
        """A PEFT adapter repo: the tiny adapter's files with `base` declared in its config and card."""
        config = json.loads((peft_dir / "adapter_config.json").read_text())
        config.update(base_model_name_or_path=base, **cfg)
        files = {"adapter_config.json": json.dumps(config).encode(),
                 "adapter_model.safetensors": peft_dir / "adapter_model.safetensors"}
        if card_base is not None:
            files["README.md"] = CARD.format(base=card_base, name=repo_id).encode()
        return self.add(repo_id, files, refs)

    def add_gguf(self, repo_id: str, gguf: Path, card_base=BASE_REPO, refs=("main",)):
        """A GGUF LoRA repo with one file and a card (nothing to convert: the quick kind of repo)."""
        return self.add(repo_id, {"README.md": CARD.format(base=card_base, name=repo_id).encode(),
                                  gguf.name: gguf}, refs)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HOME / HF_HUB_CACHE at tmp_path/hf and HF_HUB_OFFLINE=1, in the environment and in the constants
    huggingface_hub read from it at import."""
    from huggingface_hub import constants

    home, cache = tmp_path / "hf", tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    for var, value in (("HF_HOME", str(home)), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setenv(var, "1" if value is True else value)
        monkeypatch.setattr(constants, var, value)
    return HubCache(cache)


@pytest.fixture
def pool(tmp_path):
    return tmp_path / "pool"


def pull(spec, pool, tiny, **kw):
    kw.setdefault("base_repo", BASE_REPO)
    return hub.pull(spec, pool, tiny / "tiny-f32.gguf", progress=False, **kw)


def tensors(path):
    r = GGUFReader(path)
    alpha = r.fields["adapter.lora.alpha"].contents()
    return alpha, {t.name: (int(t.tensor_type), tensor_array(t)) for t in r.tensors}


def snapshot(cache: HubCache, repo_id: str, commit: str) -> Path:
    return cache.root / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit


def pool_state(pool: Path) -> dict:
    """Every file of the pool directory (temporary files included) with its bytes."""
    return {p.name: p.read_bytes() for p in pool.iterdir()} if pool.exists() else {}


# ---- the base check's rule, no model needed


def test_base_ids_of_the_default_model():
    from logo_edge.defaults import default_model_path

    ids = hub.base_ids(default_model_path())
    assert ids[0] == "huggingfacetb/smollm2-135m-instruct"  # KNOWN_REPOS; also org + file stem from the GGUF
    assert set(ids) == {"huggingfacetb/smollm2-135m-instruct"}
    assert hub.base_ids(default_model_path(), "Org/Other") == ("org/other",)


def test_base_ids_from_gguf_metadata(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "Foo-7B-Instruct-Q4_K_M.gguf"
    w = GGUFWriter(path, "llama")
    w.add_type("model")
    w.add_string("general.organization", "FooLab")
    w.add_uint32("general.base_model.count", 1)
    w.add_string("general.base_model.0.repo_url", "https://huggingface.co/FooLab/Foo-7B")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    assert hub.base_ids(path) == ("foolab/foo-7b", "foolab/foo-7b-instruct")  # its parent, then org/file stem
    assert hub._matches("foolab/Foo-7B-Instruct", hub.base_ids(path))


@pytest.mark.parametrize("declared, verdict", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
    ("https://huggingface.co/huggingfacetb/smollm2-135m-instruct", True),
    ("SmolLM2-135M-Instruct", True),  # a bare name: compared with the name part
    ("/home/me/models/SmolLM2-135M-Instruct/", True),  # a local path whose last component matches
    ("HuggingFaceTB/SmolLM2-360M-Instruct", False),
    ("meta-llama/Llama-3.2-1B", False),
    ("/home/me/checkpoints/base", None),  # a local path proves nothing
])
def test_declared_base_rule(declared, verdict):
    assert hub._matches(declared, ("huggingfacetb/smollm2-135m-instruct",)) is verdict


def test_check_base_errors_and_warnings():
    ids = ("org/base",)
    hub.check_base("r", {"README.md": ["org/other", "ORG/Base"]}, ids, "b.gguf")  # a card list: one match is enough
    with pytest.raises(hub.BaseMismatchError, match=r"declares base model 'org/other'.*b.gguf is org/base"):
        hub.check_base("r", {"README.md": ["org/base"], "adapter_config.json": ["org/other"]}, ids, "b.gguf")
    with pytest.warns(UserWarning, match="declares no base model"):
        hub.check_base("r", {"adapter_config.json": []}, ids, "b.gguf")
    with pytest.warns(UserWarning, match="local path"):
        hub.check_base("r", {"adapter_config.json": ["/tmp/x"]}, ids, "b.gguf")
    with pytest.warns(UserWarning, match="declares base model 'org/other'"):
        hub.check_base("r", {"README.md": ["org/other"]}, ids, "b.gguf", allow_mismatch=True)


def test_specs_and_list_files(tmp_path):
    assert hub.RepoSpec.parse("org/name@v2") == hub.RepoSpec("org/name", "v2")
    assert str(hub.RepoSpec.parse(" org/name ")) == "org/name"
    for bad in ("org/na me", "a/b/c", "org/name@"):
        with pytest.raises(hub.PullError, match="ORG/NAME|empty revision"):
            hub.RepoSpec.parse(bad)
    f = tmp_path / "list.txt"
    f.write_text("# adapters\norg/a\n\n  org/b@v2   # pinned\n#org/c\n")
    assert hub.read_specs(f) == ["org/a", "org/b@v2"]


# ---- pulling from the offline cache


@pytest.mark.slow
def test_pull_peft_converts_like_convert_lora(tiny, offline_hub, pool, tmp_path):
    commit = offline_hub.add_peft("test-org/math-lora", tiny / "peft" / "qv_r8")
    (entry,) = pull("test-org/math-lora", pool, tiny)
    assert entry.name == "math-lora" and entry.path == pool / "math-lora.gguf"
    assert read_manifest(pool)["adapters"]["math-lora"]["origin"] == f"hf://test-org/math-lora@{commit}"
    direct = convert_lora(snapshot(offline_hub, "test-org/math-lora", commit), tiny / "tiny-f32.gguf",
                          tmp_path / "direct.gguf", "f16", name="math-lora")
    (alpha, got), (alpha_ref, want) = tensors(entry.path), tensors(direct)
    assert alpha == alpha_ref and got.keys() == want.keys()
    for name, (qtype, arr) in want.items():
        assert got[name][0] == qtype, name
        np.testing.assert_array_equal(got[name][1], arr, err_msg=name)
    assert sorted(p.name for p in pool.iterdir()) == ["manifest.json", "math-lora.gguf"]  # nothing else left


@pytest.mark.slow
def test_pull_at_a_revision(tiny, offline_hub, pool, tmp_path):
    offline_hub.add_peft("test-org/math-lora", tiny / "peft" / "qv_r8")
    v2 = offline_hub.add_peft("test-org/math-lora", tiny / "peft" / "rs_r16", refs=("v2",))
    (entry,) = pull("test-org/math-lora@v2", pool, tiny, outtype="f32")
    assert read_manifest(pool)["adapters"]["math-lora"]["origin"] == f"hf://test-org/math-lora@{v2}"
    assert tensors(entry.path)[1].keys() == tensors(tiny / "gguf" / "rs_r16.gguf")[1].keys()  # rs_r16's, not qv_r8's
    (by_commit,) = pull(f"test-org/math-lora@{v2}", tmp_path / "pool2", tiny, outtype="f32")
    assert by_commit.path.read_bytes() == entry.path.read_bytes()


@pytest.mark.slow
def test_pull_gguf_repo_adds_files_as_they_are(tiny, offline_hub, pool):
    gguf = tiny / "gguf"
    many = offline_hub.add("test-org/tiny-loras", {
        "README.md": CARD.format(base=BASE_REPO, name="loras").encode(),
        "qv_r8.gguf": gguf / "qv_r8.gguf", "more/all7_r4.gguf": gguf / "all7_r4.gguf"})
    one_commit = offline_hub.add("test-org/one-lora", {"qkd_r2.gguf": gguf / "qkd_r2.gguf"})  # no card: a warning
    entries = pull("test-org/tiny-loras", pool, tiny)
    assert [e.name for e in entries] == ["tiny-loras-qv_r8", "tiny-loras-more-all7_r4"]
    assert entries[0].path.read_bytes() == (gguf / "qv_r8.gguf").read_bytes()
    assert entries[1].path.read_bytes() == (gguf / "all7_r4.gguf").read_bytes()
    origins = {n: a["origin"] for n, a in read_manifest(pool)["adapters"].items()}
    assert origins["tiny-loras-more-all7_r4"] == f"hf://test-org/tiny-loras@{many}/more/all7_r4.gguf"
    with pytest.warns(UserWarning, match="declares no base model"):
        (one,) = pull("test-org/one-lora", pool, tiny)
    assert one.name == "one-lora" and one.origin == f"hf://test-org/one-lora@{one_commit}/qkd_r2.gguf"
    with pytest.raises(hub.PullError, match=r"already has one-lora; pass --replace"), pytest.warns(UserWarning):
        pull("test-org/one-lora", pool, tiny)
    with pytest.warns(UserWarning):
        (again,) = pull("test-org/one-lora", pool, tiny, replace=True, name="renamed")
    assert again.path == pool / "renamed.gguf"


@pytest.mark.slow
def test_wrong_base_is_refused_and_the_pool_unchanged(tiny, offline_hub, pool):
    offline_hub.add_gguf("test-org/keep", tiny / "gguf" / "qv_r8.gguf")
    pull("test-org/keep", pool, tiny)
    before = pool_state(pool)
    offline_hub.add_peft("other-org/llama-lora", tiny / "peft" / "all7_r4", base="meta-llama/Llama-3.2-1B",
                         card_base="meta-llama/Llama-3.2-1B")
    with pytest.raises(hub.BaseMismatchError, match=r"other-org/llama-lora .*declares base model "
                       r"'meta-llama/Llama-3.2-1B'.*tiny-f32.gguf is test-org/tiny-llama"):
        pull("other-org/llama-lora", pool, tiny)
    assert pool_state(pool) == before
    with pytest.warns(UserWarning, match="meta-llama/Llama-3.2-1B"):  # the override: shapes fit, so it goes in
        (e,) = pull("other-org/llama-lora", pool, tiny, allow_base_mismatch=True)
    assert e.name == "llama-lora"


@pytest.mark.slow
def test_repo_without_adapters_names_what_it_has(tiny, offline_hub, pool):
    commit = offline_hub.add("test-org/a-model", {"README.md": b"# a model\n", "config.json": b"{}",
                                                  "model.safetensors": b"\0" * 16, "adapter_model.bin": b"x"})
    with pytest.raises(hub.PullError, match=rf"test-org/a-model \(commit {commit[:12]}\) has no adapter files.*"
                       r"adapter_model.bin \(a pickle\).*the repo has: README.md, adapter_model.bin, config.json, "
                       r"model.safetensors"):
        pull("test-org/a-model", pool, tiny)
    with pytest.raises(hub.PullError, match=r"HF_HUB_OFFLINE is set and the repo is not in the Hugging Face cache"):
        pull("test-org/never-cached", pool, tiny)
    assert not pool.exists()


@pytest.mark.slow
def test_a_failing_repo_leaves_nothing_behind(tiny, offline_hub, pool, tmp_path):
    offline_hub.add_gguf("test-org/keep", tiny / "gguf" / "qv_r8.gguf")
    pull("test-org/keep", pool, tiny)
    before = pool_state(pool)
    offline_hub.add_peft("test-org/dora", tiny / "peft" / "qv_r8", use_dora=True)
    with pytest.raises(ConversionError, match="use_dora"):
        pull("test-org/dora", pool, tiny)
    good = (tiny / "gguf" / "qv_r8.gguf").read_bytes()
    offline_hub.add("test-org/half-bad", {"README.md": CARD.format(base=BASE_REPO, name="half-bad").encode(),
                                          "a.gguf": good, "b.gguf": good[: len(good) // 2]})
    with pytest.raises(AdapterError, match="b.gguf"):  # a.gguf is sound, but the repo enters whole or not at all
        pull("test-org/half-bad", pool, tiny)
    assert pool_state(pool) == before


@pytest.mark.slow
def test_all_org_and_list_file(tiny, offline_hub, pool, tmp_path, capsys):
    gguf = tiny / "gguf"
    offline_hub.add_gguf("test-org/math-lora", gguf / "qv_r8.gguf")
    offline_hub.add_gguf("Test-Org/code-lora", gguf / "all7_r4.gguf")
    pinned = offline_hub.add_gguf("test-org/pinned", gguf / "qkd_r2.gguf", refs=())  # cached by commit only
    offline_hub.add("test-org/a-model", {"config.json": b"{}"})
    offline_hub.add_gguf("other-org/x", gguf / "rs_r16.gguf")
    specs = hub.org_specs("test-org")
    assert specs == ["test-org/a-model", "Test-Org/code-lora", "test-org/math-lora", f"test-org/pinned@{pinned}"]
    args = hub_args(tiny, pool, all=["test-org"])
    assert hub.cmd_pull(args) == 1  # a-model has no adapters: reported, the others pulled
    out, err = capsys.readouterr()
    assert sorted(p.stem for p in pool.glob("*.gguf")) == ["code-lora", "math-lora", "pinned"]
    assert "test-org/a-model (commit" in err and "1 of 4 repos failed" in err
    assert f"test-org/pinned@{pinned}: pinned -> {pool / 'pinned.gguf'}" in out

    listed = tmp_path / "repos.txt"
    listed.write_text("# two of them\nother-org/x\ntest-org/math-lora  # again, elsewhere\n")
    assert hub.cmd_pull(hub_args(tiny, tmp_path / "pool2", from_file=str(listed))) == 0
    assert sorted(p.stem for p in (tmp_path / "pool2").glob("*.gguf")) == ["math-lora", "x"]


def hub_args(tiny, pool, **kw):
    ap = argparse.ArgumentParser()
    hub.add_pull_args(ap)
    args = ap.parse_args(["--pool", str(pool), "--model", str(tiny / "tiny-f32.gguf"), "--base-repo", BASE_REPO,
                          "--no-progress"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


@pytest.mark.slow
def test_engine_routes_to_the_pulled_adapter(tiny, offline_hub, pool):
    """The pulled adapter beside the same PEFT dir converted by the fixture (tiny/gguf/qv_r8.gguf, f32):
    the same probe signal and the same answer."""
    from logo_edge.engine import Engine

    offline_hub.add_peft("test-org/math-lora", tiny / "peft" / "qv_r8")
    offline_hub.add_gguf("test-org/code-lora", tiny / "gguf" / "all7_r4.gguf")
    report = hub.pull_many(["test-org/math-lora", "test-org/code-lora"], pool, tiny / "tiny-f32.gguf",
                           progress=False, base_repo=BASE_REPO, outtype="f32")
    assert report.ok and sorted(report.pulled) == ["test-org/code-lora", "test-org/math-lora"]
    prompt = "Compute 12 plus 30."
    with Engine(tiny / "tiny-f32.gguf", [pool, tiny / "gguf" / "qv_r8.gguf"], n_ctx=256, n_batch=64, kv_type="f32",
                flash_attn=False) as eng:
        rec = eng.route(prompt, k=1)
        signal = {a.name: a.signal for a in rec.adapters}
        assert set(signal) == {"math-lora", "code-lora", "qv_r8"} and len(rec.selected) == 1
        assert signal["math-lora"] == pytest.approx(signal["qv_r8"], rel=1e-6)
        texts = {key: eng.create_completion(prompt, adapters=a, max_tokens=6)["choices"][0]["text"]
                 for key, a in (("base", "base"), ("pulled", ["math-lora"]), ("direct", ["qv_r8"]))}
    assert texts["pulled"] == texts["direct"] != texts["base"]


@pytest.mark.slow
def test_cli_pull_in_a_fresh_process(tiny, tmp_path):
    """HF_HOME alone (its hub/ subfolder is the cache) and HF_HUB_OFFLINE=1, read by huggingface_hub at import."""
    HubCache(tmp_path / "home" / "hub").add_gguf("test-org/math-lora", tiny / "gguf" / "qv_r8.gguf")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", LOGO_EDGE_POOL=str(tmp_path / "pool"))
    from logo_edge.cli import build_parser

    has_pull = re.search(r"[{,]pull[,}]", build_parser().format_usage()) is not None
    cmd = ["-m", "logo_edge.cli", "pull"] if has_pull else ["-m", "logo_edge.hub"]
    res = subprocess.run([sys.executable, *cmd, "test-org/math-lora", "--model", str(tiny / "tiny-f32.gguf"),
                          "--base-repo", BASE_REPO], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "pool" / "math-lora.gguf").is_file()
    assert f"math-lora -> {tmp_path / 'pool' / 'math-lora.gguf'}" in res.stdout
    shutil.rmtree(tmp_path / "home")
    res = subprocess.run([sys.executable, *cmd, "test-org/math-lora"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1 and "not in the Hugging Face cache" in res.stderr
