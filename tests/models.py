"""Tiny random transformers models with planted activation outliers, for tests."""

from __future__ import annotations

import torch
import transformers

ARCHS = ("llama", "mistral", "qwen2", "phi3", "gemma", "opt", "gpt2")
# dense decoders added for issue 14 (tests/test_architectures.py)
DENSE_ARCHS = ("gptj", "bloom", "phi", "cohere", "granite", "olmo2", "starcoder2", "gpt_bigcode", "mpt")

# Mixture-of-experts decoders: fused 3-D expert weights run by a grouped matmul, a top-k router.
MOE_ARCHS = ("qwen2_moe", "olmoe", "deepseek_v3")

_GQA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)


def _config(arch: str, layers: int):
    if arch == "llama":
        return transformers.LlamaConfig(**_GQA, num_hidden_layers=layers)
    if arch == "llama_wide":  # every linear's dimensions divisible by 128 (groups of 128: the low-bit presets)
        return transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                        num_key_value_heads=4, num_hidden_layers=layers)
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
    # -- dense decoders beyond the first seven (issue 14) --------------------------------------
    if arch == "gptj":  # parallel attention/MLP off one ln_1, partial rotary, fc_in -> gelu -> fc_out
        return transformers.GPTJConfig(vocab_size=128, n_embd=64, n_layer=layers, n_head=4, rotary_dim=8, n_inner=96,
                                       bos_token_id=0, eos_token_id=0)
    if arch == "bloom":  # fused query_key_value, ALiBi, dense_h_to_4h -> gelu -> dense_4h_to_h
        return transformers.BloomConfig(vocab_size=128, hidden_size=64, n_layer=layers, n_head=4)
    if arch == "phi":  # parallel attention/MLP off one input_layernorm, fc1 -> gelu_new -> fc2
        return transformers.PhiConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2)
    if arch == "cohere":  # parallel attention/SwiGLU off one bias-free LayerNorm, tied embeddings, logit scale
        return transformers.CohereConfig(**_GQA, num_hidden_layers=layers, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "granite":  # Llama with embedding / residual / attention / logit multipliers
        return transformers.GraniteConfig(**_GQA, num_hidden_layers=layers, embedding_multiplier=4.0,
                                          residual_multiplier=0.5, attention_multiplier=0.25, logits_scaling=2.0)
    if arch == "olmo2":  # RMSNorm after attention and MLP (post-norms), q/k RMSNorm over all heads
        return transformers.Olmo2Config(**_GQA, num_hidden_layers=layers, pad_token_id=0)
    if arch == "starcoder2":  # LayerNorm with bias, biased q/k/v/o, c_fc -> gelu -> c_proj
        return transformers.Starcoder2Config(**_GQA, num_hidden_layers=layers)
    if arch == "gpt_bigcode":  # multi-query attention in a fused c_attn (nn.Linear), c_fc -> gelu -> c_proj
        return transformers.GPTBigCodeConfig(vocab_size=128, n_embd=64, n_inner=96, n_layer=layers, n_head=4,
                                             multi_query=True, bos_token_id=0, eos_token_id=0)
    if arch == "mpt":  # bias-free LayerNorm, fused Wqkv, ALiBi, up_proj -> gelu -> down_proj
        return transformers.MptConfig(vocab_size=128, d_model=64, n_layers=layers, n_heads=4, expansion_ratio=2)
    # -- mixture of experts: 8 experts, top-2 (one contiguous block) --
    if arch == "qwen2_moe":  # a shared expert gated by sigmoid(shared_expert_gate(x))
        return transformers.Qwen2MoeConfig(
            **_GQA, num_hidden_layers=layers, moe_intermediate_size=32, shared_expert_intermediate_size=64,
            num_experts=8, num_experts_per_tok=2,
        )
    if arch == "olmoe":  # q/k norms after the projections, no shared expert
        return transformers.OlmoeConfig(
            **{**_GQA, "intermediate_size": 32}, num_hidden_layers=layers, num_experts=8, num_experts_per_tok=2,
            pad_token_id=0, eos_token_id=1,
        )
    if arch == "deepseek_v3":  # MLA attention, a dense first layer, a shared expert, a grouped sigmoid router
        return transformers.DeepseekV3Config(
            vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, n_group=2,
            topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32,
            qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8,
        )
    raise ValueError(arch)


# Norms that get no planted outliers: OLMo-2's and OLMoE's q_norm / k_norm scale attention logits,
# not a linear's input; a 20x channel there saturates the random model's softmax (int8-sized weight
# noise alone then moves its logits 7-22%; OLMoE's 10x more under weight-only int8), which tests the
# random model's conditioning, not quantization.
_PLAIN_NORMS = {"olmo2": ("q_norm", "k_norm"), "olmoe": ("q_norm", "k_norm")}


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
                if p.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight") \
                        and not any(f".{plain}." in name for plain in _PLAIN_NORMS.get(arch, ())):
                    boost = torch.ones_like(p)
                    boost[torch.randperm(p.numel(), generator=g)[:3]] = outliers
                    p.mul_(boost)
    return model


def fits_tiny(name: str) -> bool:
    """Whether preset ``name``'s weight groups tile the tiny models' linears (dimensions 32, 64, 96):
    the low-bit AdaDim presets' groups of 128 do not (``llama_wide`` is their tiny model)."""
    import qpass

    weight = qpass.preset(name).weight
    g = getattr(weight.granularity, "group_size", None) if weight is not None else None
    return g is None or 32 % g == 0


#: The presets the tiny models run.
TINY_PRESETS = tuple(name for name in __import__("qpass").PRESETS if fits_tiny(name))


def token_batches(n: int, batch: int = 2, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (batch, seq), generator=g) for _ in range(n)]
