"""HF base model -> GGUF by driving llama.cpp's own convert_hf_to_gguf.py from the pinned tree.

    python -m logo_edge.convert.base HF_DIR -o model.gguf [--outtype f32|f16|bf16|q8_0]

Needs torch and transformers (the `dev` extra), as the tree's converter does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from logo_edge.errors import ConversionError
from logo_edge.native.build import source_tree


def convert_base(hf_dir: str | Path, out: str | Path, outtype: str = "f32") -> Path:
    """Convert an HF model directory (config.json, safetensors, tokenizer) to a GGUF file."""
    hf_dir, out = Path(hf_dir), Path(out)
    cfg = hf_dir / "config.json"
    if not cfg.exists():
        raise ConversionError(f"{cfg}: not found; pass a Hugging Face model directory")
    try:
        config = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{cfg}: not valid JSON: {e}") from None
    if not isinstance(config, dict) or not config.get("architectures"):
        raise ConversionError(f"{cfg}: no \"architectures\" entry (a config saved from a GGUF-loaded model "
                              "lacks it); add e.g. [\"LlamaForCausalLM\"]")
    script = source_tree() / "convert_hf_to_gguf.py"
    # written beside the target, then moved over it: an interrupted or failed conversion leaves no truncated
    # GGUF at `out` (nor truncates a good one already there)
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{threading.get_ident()}.part")
    cmd = [sys.executable, str(script), str(hf_dir), "--outfile", str(tmp), "--outtype", outtype]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not tmp.exists():
            raise ConversionError(f"{hf_dir}: llama.cpp's convert_hf_to_gguf.py failed:\n{res.stderr[-3000:]}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_dir")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16", "q8_0"])
    args = ap.parse_args(argv)
    try:
        print(convert_base(args.hf_dir, args.out, args.outtype))
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
