"""`logo-edge pull`: LoRA adapters from the Hugging Face Hub into a pool, through huggingface_hub's own cache.

    logo-edge pull ORG/NAME[@REV] [--pool DIR]        logo-edge pull --all ORG        logo-edge pull --from FILE

huggingface_hub decides everything the Hub's own tools decide: where the cache is (HF_HOME, HF_HUB_CACHE),
whether the network may be used (HF_HUB_OFFLINE: the cache alone), and which token is sent (--token, else
HF_TOKEN, else `hf auth login`). A repo holds GGUF LoRA files (added as they are) or PEFT / mlx-lm adapter dirs
(converted with convert_lora); when it holds both, the GGUF files win, so one adapter never enters twice.
The base model each adapter declares (adapter_config.json `base_model_name_or_path`, the card's `base_model`)
is checked against the engine's base by name first (`base_ids`), then by shapes when converted and added.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import AdapterError, LogoEdgeError

if TYPE_CHECKING:  # pool_ops reads GGUF files: imported when a pull runs, not when the CLI parses
    from .pool_ops import PoolEntry

# what is downloaded of a repo: adapter files and the card, never full model weights
ALLOW_PATTERNS = ["*.gguf", "*adapter_config.json", "*adapter_model.safetensors", "*adapters.safetensors",
                  "README.md"]
# Hub ids of base model files whose GGUF metadata does not name their repo
KNOWN_REPOS = {"SmolLM2-135M-Instruct.Q4_1.gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_QUANT_SUFFIX = re.compile(r"[.-](?:i?q\d\w*|bf16|f16|f32)$", re.IGNORECASE)
_HUB_URL = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/", re.IGNORECASE)
_ID = re.compile(r"^[\w.-]+(?:/[\w.-]+)?$")


class PullError(AdapterError):
    """A repo could not be pulled: not found, not cached offline, no adapter files, or a wrong base."""


class BaseMismatchError(PullError):
    """The adapter declares a base model that is not the engine's."""


def _require_hub() -> None:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise PullError("pulling from the Hub needs huggingface_hub: pip install 'logo-edge[hub]'") from None


# ---- the engine's base model, by name


def _hub_id(value: str) -> str:
    """A declared base or URL as a lowercase Hub id (`org/name`), or as it is when it is no Hub URL."""
    return _HUB_URL.sub("", value.strip()).rstrip("/").lower()


def base_ids(base: str | Path, base_repo: str | None = None) -> tuple[str, ...]:
    """The lowercase Hub ids a base GGUF answers to; `base_repo`, when given, alone.

    Otherwise: its known repo (KNOWN_REPOS, by file name); the repos its GGUF metadata names as its source
    or its parents (general.source.repo_url, general.base_model.N.repo_url or organization/name); and
    general.organization/<file stem without a quantization suffix>, or the stem alone without an organization."""
    if base_repo:
        return (_hub_id(base_repo),)
    base = Path(base)
    meta = _general(_stamp(base))
    ids = [KNOWN_REPOS.get(base.name, "")]
    ids += [meta.get(k, "") for k in ("general.source.repo_url", "general.repo_url")]
    for i in range(int(meta.get("general.base_model.count", 0))):
        key = f"general.base_model.{i}"
        ids.append(meta.get(f"{key}.repo_url", ""))
        if meta.get(f"{key}.organization") and meta.get(f"{key}.name"):
            ids.append(f"{meta[f'{key}.organization']}/{meta[f'{key}.name']}".replace(" ", "-"))
    stem = _QUANT_SUFFIX.sub("", base.name.removesuffix(".gguf"))
    ids.append(f"{meta['general.organization']}/{stem}" if meta.get("general.organization") else stem)
    out = [_hub_id(i) for i in ids if i]
    return tuple(dict.fromkeys(i for i in out if _ID.match(i)))


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


# a base GGUF's metadata takes gguf-py seconds to parse (its vocabulary, token by token): read once a process
@functools.lru_cache(maxsize=4)
def _general(stamp: tuple[str, int, int]) -> dict:
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(stamp[0]).fields.items() if k.startswith("general.")}


@functools.lru_cache(maxsize=4)
def _base_info(stamp: tuple[str, int, int]):
    from .gguf_files import BaseInfo

    return BaseInfo.read(stamp[0])


def read_base(base: Path):
    """The base GGUF's BaseInfo (cached while the file is unchanged); ModelLoadError names a bad one."""
    from .gguf_files import BaseInfo

    return _base_info(_stamp(base)) if base.is_file() else BaseInfo.read(base)


def _matches(declared: str, ids: tuple[str, ...]) -> bool | None:
    """Whether a declared base names the engine's base: True, False, or None when it is a local path
    whose last component does not match (a local directory's name proves nothing either way)."""
    d = _hub_id(declared)
    names = {i.rsplit("/", 1)[-1] for i in ids}
    if _ID.match(d):
        return d in ids if "/" in d else d in names
    return True if d.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] in names else None


def check_base(label: str, declared: dict[str, list[str]], ids: tuple[str, ...], base_name: str,
               allow_mismatch: bool = False) -> None:
    """Raise BaseMismatchError when a source (file -> the bases it declares) names none of `ids`.

    A source that declares only local paths, or a repo that declares nothing, gets a warning: the
    adapter is then checked by its shapes alone (when converted and added)."""
    if not any(declared.values()):
        warnings.warn(f"{label} declares no base model; checked against {base_name} by shapes only",
                      UserWarning, stacklevel=3)
    for source, values in declared.items():
        verdicts = [_matches(v, ids) for v in values]
        if not values or True in verdicts:
            continue
        if False not in verdicts:
            warnings.warn(f"{label}: {source} names its base by a local path ({', '.join(values)}); "
                          f"checked against {base_name} by shapes only", UserWarning, stacklevel=3)
            continue
        msg = (f"{label}: {source} declares base model {' / '.join(map(repr, values))}, but the engine's base "
               f"{base_name} is {' / '.join(ids) or 'unnamed'}; pass --model with that base's GGUF, --base-repo ID "
               "if it is another name for this base, or --allow-base-mismatch to add it anyway (shapes are "
               "still checked)")
        if not allow_mismatch:
            raise BaseMismatchError(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)


# ---- what a snapshot holds


@dataclass(frozen=True)
class RepoSpec:
    """`ORG/NAME` or `ORG/NAME@REV` (a branch, tag or commit)."""

    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "RepoSpec":
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        repo_id, _, rev = spec.strip().partition("@")
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            raise PullError(f"{spec!r} is not a Hub repo (ORG/NAME[@REV]): {e}") from None
        if "@" in spec and not rev:
            raise PullError(f"{spec!r}: an empty revision after '@'")
        return cls(repo_id, rev or None)

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass
class Found:
    """Adapters found in a snapshot: GGUF LoRA files, PEFT / mlx-lm dirs, and GGUF files that are no LoRA."""

    gguf: list[Path] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)
    not_lora: dict[Path, str] = field(default_factory=dict)  # file -> its general.type


def _gguf_type(path: Path) -> str | None:
    from gguf import GGUFReader

    try:
        f = GGUFReader(path).fields.get("general.type")
        return f.contents() if f is not None else None
    except Exception:  # unreadable: left to the strict reader, which names the problem
        return "adapter"


def _is_adapter_dir(d: Path) -> bool:
    from .convert.mlx import is_mlx_adapter

    return (d / "adapter_config.json").is_file() and \
        ((d / "adapter_model.safetensors").is_file() or is_mlx_adapter(d))


def find_adapters(snapshot: Path) -> Found:
    """The adapters in a downloaded snapshot, root first, then subfolders in order."""
    found = Found()
    for p in sorted(snapshot.rglob("*.gguf"), key=lambda p: (len(p.parts), p)):
        kind = _gguf_type(p)
        if kind == "adapter":
            found.gguf.append(p)
        else:
            found.not_lora[p] = str(kind)
    configs = sorted(snapshot.rglob("adapter_config.json"), key=lambda p: (len(p.parts), p))
    found.dirs = [c.parent for c in configs if _is_adapter_dir(c.parent)]
    return found


def declared_bases(snapshot: Path, dirs: list[Path]) -> dict[str, list[str]]:
    """Source file (relative) -> the base models it declares: the card's `base_model`, each adapter
    config's `base_model_name_or_path`."""
    import json

    from huggingface_hub.repocard import metadata_load

    out: dict[str, list[str]] = {}
    card = snapshot / "README.md"
    if card.is_file():
        try:
            value = (metadata_load(card) or {}).get("base_model")
        except Exception as e:  # a broken card is not worth failing the pull; the configs still declare
            warnings.warn(f"{card}: unreadable card metadata ({e}); ignored", UserWarning, stacklevel=2)
            value = None
        out["README.md (base_model)"] = [value] if isinstance(value, str) else [str(v) for v in value or []]
    for d in dirs:
        try:
            value = json.loads((d / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            value = None  # the converter reports a broken config
        rel = (d / "adapter_config.json").relative_to(snapshot).as_posix()
        out[f"{rel} (base_model_name_or_path)"] = [value] if value else []
    return out


def _repo_files(spec: RepoSpec, commit: str, snapshot: Path, token) -> list[str]:
    """Every file of the repo at `commit`: the Hub's listing when online, else what the cache holds."""
    from huggingface_hub import HfApi, constants

    if not constants.HF_HUB_OFFLINE:
        try:
            return sorted(HfApi(token=token).list_repo_files(spec.repo_id, revision=commit))
        except Exception:  # only for an error message: fall back to the cache
            pass
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


# ---- pulling


def _download(spec: RepoSpec, token, progress: bool) -> Path:
    """snapshot_download of the adapter files; huggingface_hub's errors become a PullError naming the repo."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec.repo_id, revision=spec.revision, allow_patterns=ALLOW_PATTERNS,
                                      token=token, tqdm_class=None if progress else _quiet_tqdm()))
    except LocalEntryNotFoundError as e:
        where = "HF_HUB_OFFLINE is set and " if constants.HF_HUB_OFFLINE else ""
        raise PullError(f"{spec}: {where}the repo is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) at "
                        f"revision {spec.revision or 'main'}: {e}") from None
    except (HfHubHTTPError, HFValidationError, OSError) as e:
        raise PullError(f"{spec}: {type(e).__name__}: {e}") from None


def _quiet_tqdm():
    """huggingface_hub's tqdm class, always off (progress=False)."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Quiet(hf_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def _safe(name: str) -> str:
    """A name pool_ops.check_name takes: other characters become '-', at most 100."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-._+")[:100] or "adapter"


def _names(spec: RepoSpec, snapshot: Path, paths: list[Path], name: str | None) -> list[str]:
    """Pool names: the repo's name for its only adapter (or `name`), else the repo name and the path."""
    repo_name = spec.repo_id.rsplit("/", 1)[-1]
    if len(paths) == 1:
        return [_safe(name or repo_name)]
    if name:
        raise PullError(f"{spec}: --name needs a repo with one adapter; it has {len(paths)}: "
                        + ", ".join(p.relative_to(snapshot).as_posix() for p in paths))
    rels = [p.relative_to(snapshot).as_posix().removesuffix(".gguf") for p in paths]
    return [_safe(f"{repo_name}-{r}" if r != "." else repo_name) for r in rels]


def _origin(spec: RepoSpec, commit: str, snapshot: Path, path: Path) -> str:
    """hf://ORG/NAME@COMMIT[/PATH]: HfFileSystem's URL of the adapter at the commit it came from."""
    rel = path.relative_to(snapshot).as_posix()
    return f"hf://{spec.repo_id}@{commit}" + ("" if rel == "." else f"/{rel}")


def _no_adapters(spec: RepoSpec, commit: str, snapshot: Path, found: Found, token) -> PullError:
    files = _repo_files(spec, commit, snapshot, token)
    notes = [f"{p.relative_to(snapshot).as_posix()} is a GGUF of type {t!r}, not a LoRA"
             for p, t in found.not_lora.items()]
    if any(f.endswith("adapter_model.bin") for f in files):
        notes.append("adapter_model.bin (a pickle) is not read; the adapter must be saved as safetensors")
    return PullError(f"{spec} (commit {commit[:12]}) has no adapter files: a GGUF LoRA (*.gguf of type adapter), "
                     "or a PEFT / mlx-lm dir (adapter_config.json + adapter_model.safetensors / "
                     f"adapters.safetensors); {'; '.join(notes) + '; ' if notes else ''}"
                     f"the repo has: {', '.join(files) or 'no files'}")


def pull(spec: str, pool_dir: str | Path | None = None, base: str | Path | None = None, *,
         base_repo: str | None = None, token: str | bool | None = None, allow_base_mismatch: bool = False,
         outtype: str = "f16", name: str | None = None, replace: bool = False,
         progress: bool = True) -> list[PoolEntry]:
    """Download ORG/NAME[@REV] and add its adapters to the pool at `pool_dir` (default: the user's pool).

    GGUF LoRA files are added as they are; PEFT / mlx-lm dirs are converted for `base` (default: the default
    model) at `outtype` into a temporary file, then moved in. Every adapter of the repo is converted and
    validated before any is added, so a repo that fails leaves the pool as it was. `name` names a repo's only
    adapter. Returns the pool entries; raises PullError (BaseMismatchError for a wrong base), ConversionError
    or AdapterError."""
    from . import defaults, pool_ops
    from .convert.lora import convert_lora
    from .gguf_files import read_lora

    _require_hub()
    rs = RepoSpec.parse(spec)
    pool_dir = Path(pool_dir) if pool_dir is not None else pool_ops.user_pool_dir()
    base = Path(base) if base is not None else defaults.default_model_path()
    info = read_base(base)  # a bad base fails before any download
    snapshot = _download(rs, token, progress)
    commit = snapshot.name
    label = f"{rs} (commit {commit[:12]})"
    found = find_adapters(snapshot)
    paths = found.gguf or found.dirs  # GGUF files as published win over their PEFT source
    if not paths:
        raise _no_adapters(rs, commit, snapshot, found, token)
    check_base(label, declared_bases(snapshot, found.dirs if not found.gguf else []), base_ids(base, base_repo),
               base.name, allow_base_mismatch)
    names = [pool_ops.check_name(n) for n in _names(rs, snapshot, paths, name)]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:  # two adapters of the repository under one name: no flag makes that right
        raise PullError(f"{label}: its adapters at "
                        f"{', '.join(p.relative_to(snapshot).as_posix() for p, n in zip(paths, names) if n in clash)} "
                        f"would all take the pool name {', '.join(clash)}; add them one at a time from the download "
                        f"({snapshot}) with `logo-edge pool add --name`")
    taken = [n for n in names if (pool_dir / f"{n}.gguf").exists() and not replace]
    if taken:
        raise PullError(f"{label}: the pool {pool_dir} already has {', '.join(taken)}; pass --replace "
                        "to overwrite, or --name to add it under another name")
    with tempfile.TemporaryDirectory(prefix="logo-edge-pull-") as tmp:
        if found.gguf:
            for p in paths:
                read_lora(p, info, only=[])  # validate every file before adding any
            ready = [(p, False) for p in paths]  # copied: the cache keeps its own
        else:
            ready = [(convert_lora(d, base, Path(tmp) / f"{n}.gguf", outtype, name=n), True)
                     for d, n in _bar(list(zip(paths, names)), f"converting {rs.repo_id}", progress)]
        return [pool_ops.add_file(pool_dir, src, name=n, origin=_origin(rs, commit, snapshot, p), base=info,
                                  move=move, replace=replace)
                for (src, move), n, p in zip(ready, names, paths)]


def _bar(items: list, desc: str, progress: bool, unit: str = "adapter"):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, disable=not progress or None, leave=False, file=sys.stderr)


# ---- many repos


@dataclass
class PullReport:
    """What pull_many did: spec -> pool entries for the repos pulled, spec -> error message for the others."""

    pulled: dict[str, list[PoolEntry]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def pull_many(specs, pool_dir: str | Path | None = None, base: str | Path | None = None, *,
              progress: bool = True, **kwargs) -> PullReport:
    """pull() each spec (duplicates once); a repo that fails is recorded in the report and the others go on."""
    report = PullReport()
    specs = list(dict.fromkeys(s.strip() for s in specs if s.strip()))
    bar = _bar(specs, "pulling", progress, unit="repo")
    for spec in bar:
        bar.set_postfix_str(spec, refresh=False)
        try:
            report.pulled[spec] = pull(spec, pool_dir, base, progress=progress, **kwargs)
        except LogoEdgeError as e:
            report.failed[spec] = str(e)
    return report


def read_specs(path: str | Path) -> list[str]:
    """Specs of a list file: one ORG/NAME[@REV] a line; blank lines and # comments are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise PullError(f"{path}: cannot read the list of repos: {e}") from None
    return [s for line in lines if (s := line.split("#", 1)[0].strip())]


def org_specs(org: str, token: str | bool | None = None) -> list[str]:
    """Every model repo of `org`: the Hub's list online; offline, the org's repos in the Hugging Face cache
    (at `main` when cached, else at the most recent cached commit)."""
    _require_hub()
    from huggingface_hub import HfApi, constants, scan_cache_dir
    from huggingface_hub.utils import CacheNotFound, HfHubHTTPError

    if not constants.HF_HUB_OFFLINE:
        try:
            return sorted(m.id for m in HfApi(token=token).list_models(author=org))
        except HfHubHTTPError as e:
            raise PullError(f"--all {org}: listing the org's models failed: {e}") from None
    try:
        cache = scan_cache_dir(constants.HF_HUB_CACHE)  # its default is bound at import, not patchable
    except CacheNotFound as e:
        raise PullError(f"--all {org}: HF_HUB_OFFLINE is set and there is no Hugging Face cache: {e}") from None
    specs = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model" or not repo.repo_id.lower().startswith(org.lower() + "/"):
            continue
        at_main = any("main" in r.refs for r in repo.revisions)
        latest = max(repo.revisions, key=lambda r: r.last_modified, default=None)
        if at_main or latest is not None:
            specs.append(repo.repo_id if at_main else f"{repo.repo_id}@{latest.commit_hash}")
    return specs


# ---- command line


def add_pull_args(p: argparse.ArgumentParser) -> None:
    """The `pull` command's arguments (and its handler, cmd_pull)."""
    p.add_argument("repos", nargs="*", metavar="REPO[@REV]", help="Hub repos: ORG/NAME, optionally @branch/tag/commit")
    p.add_argument("--all", action="append", default=[], metavar="ORG",
                   help="every model repo of ORG (offline: those in the Hugging Face cache)")
    p.add_argument("--from", dest="from_file", metavar="FILE", help="a list of repos, one a line (# comments)")
    p.add_argument("--pool", help="the pool directory (default: $LOGO_EDGE_POOL, else the user's data dir)")
    p.add_argument("--model", help="the base model GGUF adapters are checked and converted for (default: the "
                   "default model)")
    p.add_argument("--base-repo", metavar="ID", help="the base model's Hub id, when its GGUF does not say it")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="add adapters that declare another base (a warning; shapes are still checked)")
    p.add_argument("--outtype", default="f16", choices=["f32", "f16", "q8_0"], help="for converted adapters")
    p.add_argument("--name", help="the pool name of a repo's only adapter (default: the repo's name)")
    p.add_argument("--replace", action="store_true", help="overwrite adapters of the same name in the pool")
    p.add_argument("--token", help="Hub token (default: huggingface_hub's own: HF_TOKEN, then `hf auth login`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_pull)


def cmd_pull(args) -> int:
    """Pull every repo named; prints what entered the pool and each failure. 0 when all were pulled."""
    specs = list(args.repos)
    if args.from_file:
        specs += read_specs(args.from_file)
    for org in args.all:
        specs += org_specs(org, args.token)
    if not specs:
        raise PullError("nothing to pull: name REPO[@REV], --all ORG or --from FILE"
                        + (" (no repos found)" if args.all or args.from_file else ""))
    if args.name and len(set(specs)) > 1:
        raise PullError(f"--name names one repo's adapter; {len(set(specs))} repos were given")
    with warnings.catch_warnings(record=True) as caught:  # shown as lines of their own, not as source lines
        warnings.simplefilter("always")
        report = pull_many(specs, args.pool, args.model, progress=not args.no_progress, base_repo=args.base_repo,
                           token=args.token, allow_base_mismatch=args.allow_base_mismatch, outtype=args.outtype,
                           name=args.name, replace=args.replace)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    for spec, entries in report.pulled.items():
        for e in entries:
            print(f"{spec}: {e.name} -> {e.path}")
    for spec, err in report.failed.items():
        print(f"error: {err}", file=sys.stderr)
    if report.failed:
        print(f"{len(report.failed)} of {len(report.failed) + len(report.pulled)} repos failed", file=sys.stderr)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="logo-edge pull", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pull_args(ap)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except LogoEdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
