"""Tiny random transformers models with planted activation outliers, for tests."""

from __future__ import annotations

import torch
import transformers

ARCHS = ("llama", "mistral", "qwen2", "phi3", "gemma", "opt", "gpt2")

_GQA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)


def _config(arch: str, layers: int):
    if arch == "llama":
        return transformers.LlamaConfig(**_GQA, num_hidden_layers=layers)
    if arch == "mistral":
        return transformers.MistralConfig(**_GQA, num_hidden_layers=layers)
    if arch == "qwen2":
        return transformers.Qwen2Config(**_GQA, num_hidden_layers=layers)
    if arch == "phi3":
        return transformers.Phi3Config(**_GQA, num_hidden_layers=layers, pad_token_id=0)
    if arch == "gemma":
        return transformers.GemmaConfig(**_GQA, num_hidden_layers=layers, head_dim=16)
    if arch == "opt":
        return transformers.OPTConfig(
            vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=layers, num_attention_heads=4,
            word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=layers, n_head=4, bos_token_id=0, eos_token_id=0)
    raise ValueError(arch)


def tiny_model(arch: str, layers: int = 2, seed: int = 0, outliers: float = 20.0) -> torch.nn.Module:
    """A random ``arch`` model in eval mode. ``outliers`` scales three channels of
    every norm weight (20x by default; 0 leaves them), so activations have the
    outlier channels real LLMs have."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(arch, layers)).eval()
    if outliers:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                    boost = torch.ones_like(p)
                    boost[torch.randperm(p.numel(), generator=g)[:3]] = outliers
                    p.mul_(boost)
    return model


def token_batches(n: int, batch: int = 2, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (batch, seq), generator=g) for _ in range(n)]
