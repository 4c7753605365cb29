"""Prefix tuning specifics: where the prefix lives in the KV cache, folding after training, init, dtypes."""
import pytest
import torch

from peftlab.models import LlamaConfig, LlamaForCausalLM
from peftlab.tuners import get_peft_model
from peftlab.tuners.io import load_adapter, save_adapter
from peftlab.tuners.prefix import PrefixEncoder, PrefixTuningConfig, StaticPrefix
from peftlab.tuners.prompt import PromptTuningConfig

CFG = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
N, L, G, D = 3, 3, 2, 16


def base(dtype=torch.float32):
    return LlamaForCausalLM(LlamaConfig(**CFG)).reset_parameters(seed=5).to(dtype)


def test_prefix_sits_in_every_layers_cache_in_hf_layout():
    model = get_peft_model(base(), PrefixTuningConfig(num_virtual_tokens=N, encoder_hidden_size=8)).eval()
    ids = torch.randint(3, 97, (2, 6))
    cache = model.new_kv_cache()
    with torch.no_grad():
        model(ids, kv_cache=cache)
        P = model.prompt().view(N, L, 2, G, D)  # row i: [layer, key/value, kv head, head dim]
    assert cache.length == N + 6 and cache.num_virtual == N
    for l in range(L):
        for b in range(2):
            assert torch.equal(cache.k[l][b, :, :N], P[:, l, 0].permute(1, 0, 2))
            assert torch.equal(cache.v[l][b, :, :N], P[:, l, 1].permute(1, 0, 2))


def test_static_prefix_is_read_only():
    k = [torch.randn(1, G, N, D)]
    sp = StaticPrefix(k, k)
    new = torch.randn(1, G, 2, D)
    a, _ = sp.append(0, new, new)
    b, _ = sp.append(0, new, new)  # a recomputed layer sees the same keys
    assert torch.equal(a, b) and a.shape == (1, G, N + 2, D) and sp.length == N


def test_exported_prefix_reproduces_training_outputs_exactly(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(base(), PrefixTuningConfig(num_virtual_tokens=N, encoder_hidden_size=8)).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 97, (2, 7))
    for _ in range(3):
        model(ids).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        trained = model(ids)  # the training-time path: MLP applied inside the forward
    assert isinstance(model.prompt_encoder["default"], PrefixEncoder)
    save_adapter(model, tmp_path)
    folded = load_adapter(base(), tmp_path)
    assert not hasattr(folded.prompt_encoder["default"], "transform")
    assert sum(p.numel() for p in folded.parameters()) - sum(p.numel() for p in base().parameters()) == N * L * 2 * G * D
    with torch.no_grad():
        assert torch.equal(folded(ids), trained)


@pytest.mark.parametrize("projection", [True, False])
def test_zero_init_gives_zero_keys_and_values(projection):
    cfg = PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=projection, init_weights="zero", encoder_hidden_size=8)
    model = get_peft_model(base(), cfg)
    assert torch.count_nonzero(model.prompt()) == 0 and model.prompt().shape == (N, L * 2 * G * D)


@pytest.mark.parametrize("config", [PrefixTuningConfig(num_virtual_tokens=N, encoder_hidden_size=8),
                                    PromptTuningConfig(num_virtual_tokens=N)], ids=["prefix", "prompt"])
def test_low_precision_base_keeps_float32_prompt_parameters(config):
    model = get_peft_model(base(torch.bfloat16), config)
    assert all(p.dtype == torch.float32 for p in model.prompt_encoder.parameters())
    logits = model(torch.randint(3, 97, (2, 5)))
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, 5, 97)
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.prompt_encoder.parameters())
