"""PEFT helpers shared by the fixtures (tiny.py, families.py) and the reference tests: random adapters, mixtures."""

from __future__ import annotations

from pathlib import Path


def random_lora(hf_dir: Path, lora_kwargs: dict, seed: int, out: Path) -> None:
    """A PEFT LoRA on the model in hf_dir with every lora_ weight drawn N(0, 0.15^2) from `seed`, saved to out."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    peft_model.save_pretrained(out)


def peft_mixture(hf_dir: Path, peft_root: Path, weights: dict):
    """transformers + PEFT with every adapter of `weights` active and its scaling multiplied by w."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    names = list(weights)
    model = PeftModel.from_pretrained(base, peft_root / names[0], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(peft_root / n, adapter_name=n)
    model.base_model.set_adapter(names)
    for mod in model.modules():
        if isinstance(mod, LoraLayer):
            for n in names:
                if n in mod.scaling:
                    mod.scaling[n] *= weights[n]
    return model.eval()
