import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}


def tiny_model(kind: str = "llama", layers: int = 2, hidden: int = 64, inter: int = 160, seed: int = 0):
    torch.manual_seed(seed)
    cfg = CONFIGS[kind](hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                        max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture
def tiny_qwen2():
    return tiny_model("qwen2")


def int64_group_matmul(ua: torch.Tensor, uw: torch.Tensor, group_len: int) -> torch.Tensor:
    """Reference accumulator: sum_k ua[m, k] * uw[n, k] per K group of group_len, in int64 -> [M, N, G]."""
    m, k = ua.shape
    groups = -(-k // group_len)
    out = torch.zeros(m, uw.shape[0], groups, dtype=torch.int64)
    for g in range(groups):
        sl = slice(g * group_len, (g + 1) * group_len)
        out[:, :, g] = ua[:, sl] @ uw[:, sl].T
    return out
