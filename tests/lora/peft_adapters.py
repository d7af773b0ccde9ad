"""Random non-zero PEFT LoRA adapters on tiny base models: the reference every LoRA test compares against."""
from __future__ import annotations

import copy

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_adapter(hf_model, path, rank: int = 8, alpha: int = 16, targets=ALL_TARGETS, use_rslora: bool = False,
                  seed: int = 1, scale: float = 1.0):
    """Save a random adapter of hf_model (a copy is adapted; hf_model is left alone) to path; return the PEFT model
    (float32, eval). scale multiplies lora_B, so the adapter visibly changes greedy tokens."""
    import peft
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora,
                             init_lora_weights=False, lora_dropout=0.0, bias="none")
    model = peft.get_peft_model(copy.deepcopy(hf_model), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    model.eval()
    model.save_pretrained(str(path))
    return model


def greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             min_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()
