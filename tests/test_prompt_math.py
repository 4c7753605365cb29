"""Virtual-token methods (prompt tuning, P-tuning, prefix / deep prompt tuning): the math they promise.

Every property is checked for all five variants on a tiny grouped-query model (hidden 64,
2 layers, 4 query / 2 key-value heads): frozen base, batch == separate rows under left padding,
KV-cache decoding == full forward, save/load round trip, gradient checkpointing.
"""
import json

import pytest
import torch

from peftlab.errors import AdapterError, ConfigError, PeftlabError
from peftlab.models import LlamaConfig, LlamaForCausalLM
from peftlab.tuners import get_peft_model, trainable_parameters_report
from peftlab.tuners.io import load_adapter, save_adapter
from peftlab.tuners.prefix import PrefixTuningConfig
from peftlab.tuners.prompt import PromptTable, PromptTuningConfig, PTuningConfig, VirtualTokenModel

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CFG = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
N = 4
METHODS = {
    "prompt_tuning": lambda: PromptTuningConfig(num_virtual_tokens=N),
    "p_tuning_mlp": lambda: PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=16),
    "p_tuning_lstm": lambda: PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=16,
                                           encoder_reparameterization_type="LSTM"),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=N, encoder_hidden_size=16),
    "deep_prompt": lambda: PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=False),
}


def base_model(device="cpu", seed=1):
    return LlamaForCausalLM(LlamaConfig(**CFG)).reset_parameters(seed=seed).to(device)


def make(method, device="cpu", seed=1):
    torch.manual_seed(seed + 100)
    model = get_peft_model(base_model(device, seed), METHODS[method]())
    if method == "deep_prompt":  # N(0, 1) keys/values saturate attention; a smaller scale tests more
        with torch.no_grad():
            model.prompt_encoder["default"].embedding.weight.mul_(0.3)
    return model


def left_pad(rows, device="cpu"):
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return ids.to(device), mask.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(METHODS))
def test_a_training_step_changes_only_prompt_parameters(method, device):
    model = make(method, device).train()
    base_before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    prompt_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert prompt_before and all(n.startswith("prompt_encoder.default.") for n in prompt_before)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 97, (2, 6), device=device)
    logits = model(ids)
    assert logits.shape == (2, 6, 97)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)).backward()
    opt.step()
    for n, p in model.base_model.named_parameters():
        assert p.grad is None, n
    for k, v in model.base_model.state_dict().items():
        assert torch.equal(v, base_before[k]), f"base tensor {k} changed"
    for n, p in model.named_parameters():
        if n in prompt_before:
            assert not torch.equal(p.detach(), prompt_before[n]), f"prompt tensor {n} did not move"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", list(METHODS))
def test_left_padded_batch_equals_separate_forwards(method, device):
    model = make(method, device).eval()
    rows = [[5, 17, 33], [8, 9, 10, 11, 12, 13, 14], [40, 41, 42, 43, 44]]
    ids, mask = left_pad(rows, device)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r], device=device))
            torch.testing.assert_close(batch[i, -len(r):], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_kv_cache_decoding_equals_full_forward(method):
    model = make(method).eval()
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache()
        parts = [model(ids[:, :5], kv_cache=cache)]
        assert cache.length == N + 5
        for t in range(5, 9):
            parts.append(model(ids[:, t:t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_batched_left_padded_generation_equals_single_rows(method):
    model = make(method).eval()
    rows = [[5, 17, 33], [8, 9, 10, 11, 12, 13, 14]]
    ids, mask = left_pad(rows)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6)
    for i, r in enumerate(rows):
        alone = model.generate(torch.tensor([r]), max_new_tokens=6)
        assert torch.equal(out[i], alone[0])
    # greedy decoding through the cache equals argmax over repeated full forwards
    seq = torch.tensor([rows[1]])
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq[0, 7:], out[1])


@pytest.mark.parametrize("method", list(METHODS))
def test_save_load_round_trip_is_exact_and_folded(method, tmp_path):
    model = make(method).eval()
    save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["peft_type"] == model.active_config.peft_type
    assert meta["num_virtual_tokens"] == N and meta["num_transformer_submodules"] == 1
    assert meta["task_type"] == "CAUSAL_LM" and meta["num_layers"] == 2
    is_prefix = method in ("prefix", "deep_prompt")
    assert meta["token_dim"] == (32 if is_prefix else 64)  # prefix: kv heads 2 x head_dim 16
    assert meta["num_attention_heads"] == (2 if is_prefix else 4)
    loaded = load_adapter(base_model(), tmp_path).eval()
    assert isinstance(loaded.prompt_encoder["default"], PromptTable)
    assert not any(p.requires_grad for p in loaded.parameters())
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_fold_keeps_outputs_bit_for_bit(method):
    model = make(method).eval()
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        before = model(ids)
        model.fold()
        after = model(ids)
    assert torch.equal(before, after)
    assert isinstance(model.prompt_encoder["default"], PromptTable)
    width = 2 * 2 * 32 if method in ("prefix", "deep_prompt") else 64
    assert sum(p.numel() for p in model.prompt_encoder.parameters()) == N * width


@pytest.mark.parametrize("method", list(METHODS))
def test_gradient_checkpointing_gives_the_same_prompt_gradients(method):
    model = make(method).train()
    ids = torch.randint(3, 97, (2, 6))
    model(ids).pow(2).mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids).pow(2).mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5)


def test_parameter_counts():
    d, L, kv = 64, 2, 32
    assert "trainable params: 256 " in trainable_parameters_report(make("prompt_tuning"))  # N * d
    assert sum(p.numel() for p in make("prompt_tuning").parameters() if p.requires_grad) == N * d
    assert sum(p.numel() for p in make("deep_prompt").parameters() if p.requires_grad) == N * L * 2 * kv
    prefix = make("prefix")
    h = 16
    mlp = N * kv + (kv * h + h) + (h * L * 2 * kv + L * 2 * kv)
    assert sum(p.numel() for p in prefix.parameters() if p.requires_grad) == mlp
    assert sum(p.numel() for p in prefix.fold().prompt_encoder.parameters()) == N * L * 2 * kv


def test_prompt_tuning_initialisations():
    model = make("prompt_tuning")
    P = model.prompt().detach()
    assert P.shape == (N, 64) and P.dtype == torch.float32
    assert float(P.min()) >= -0.5 and float(P.max()) <= 0.5 and float(P.std()) > 0.2  # U(-0.5, 0.5): std 0.29

    class Tok:
        def encode(self, text):
            return {"hello world": [5, 6, 7]}[text]

    emb = base_model().get_input_embeddings().weight
    cfg = PromptTuningConfig(num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text="hello world",
                             tokenizer=Tok())
    text = get_peft_model(base_model(), cfg)
    assert torch.equal(text.prompt().detach(), emb[[5, 6, 7, 5, 6, 7, 5]])
    assert text.active_config.tokenizer is None  # the object is not kept on the saved config

    ids = [10, 11, 12, 13, 14, 15]
    vocab = get_peft_model(base_model(), PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="VOCAB", vocab_ids=ids))
    rows = vocab.prompt().detach()
    picked = [next(i for i in ids if torch.equal(r, emb[i])) for r in rows]
    assert len(set(picked)) == 5  # distinct tokens while there are enough candidates
    top = get_peft_model(base_model(), PromptTuningConfig(num_virtual_tokens=N, prompt_tuning_init="VOCAB", vocab_top_k=6))
    allowed = [i for i in range(97) if i not in (0, 1, 2)][:6]
    for r in top.prompt().detach():
        assert any(torch.equal(r, emb[i]) for i in allowed)


def test_config_errors():
    with pytest.raises(ConfigError, match="prompt_tuning_init"):
        PromptTuningConfig(prompt_tuning_init="WORDS")
    with pytest.raises(ConfigError, match="prompt_tuning_init_text"):
        PromptTuningConfig(prompt_tuning_init="TEXT")
    with pytest.raises(ConfigError, match="encoder_num_layers"):
        PTuningConfig(encoder_num_layers=3)
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        PrefixTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ConfigError, match="alias"):
        PrefixTuningConfig(encoder_hidden_size=64, projection_hidden_size=32)
    assert PrefixTuningConfig(projection_hidden_size=32).encoder_hidden_size == 32
    assert PrefixTuningConfig().encoder_hidden_size == 512
    assert "projection_hidden_size" not in PrefixTuningConfig().to_peft_dict()
    with pytest.raises(AdapterError, match="already carries"):
        get_peft_model(make("prompt_tuning"), PromptTuningConfig())
    with pytest.raises(AdapterError, match="token_dim"):
        get_peft_model(base_model(), PromptTuningConfig(token_dim=32))


def test_bad_adapter_files_name_the_problem(tmp_path):
    model = make("prefix")
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "prefix_projecton": True}))
    with pytest.raises(ConfigError, match="prefix_projecton.*did you mean"):
        load_adapter(base_model(), tmp_path)
    path.write_text(json.dumps({**meta, "num_layers": 3}))
    with pytest.raises(AdapterError, match="num_layers"):
        load_adapter(base_model(), tmp_path)
    path.write_text(json.dumps(meta))
    from peftlab.fileio import save_safetensors

    save_safetensors({"prompt_embeddings": torch.zeros(N, 7)}, tmp_path / "adapter_model.safetensors")
    base = base_model()
    with pytest.raises(AdapterError, match=r"prompt_embeddings.*shape \(4, 7\)"):
        load_adapter(base, tmp_path)
    assert all(p.requires_grad for p in base.parameters())   # refused before anything changed
    save_safetensors({"prompt_embeddings": torch.zeros(N, 128), "extra": torch.zeros(1)},
                     tmp_path / "adapter_model.safetensors")
    with pytest.raises(PeftlabError, match="extra"):
        load_adapter(base_model(), tmp_path)


def test_foreign_cache_is_refused():
    model = make("prefix")
    with pytest.raises(AdapterError, match="new_kv_cache"):
        model(torch.tensor([[5, 6]]), kv_cache=model.base_model.new_kv_cache())
    assert isinstance(model, VirtualTokenModel)


def test_text_and_vocab_init_from_a_sentencepiece_tokenizer(tmp_path):
    from peftlab.tokenizer import Tokenizer

    texts = [f"the quick brown fox jumps over the lazy dog {i}" for i in range(50)]
    tok = Tokenizer.train(texts, None, vocab_size=300)
    tok.save(tmp_path)
    model = LlamaForCausalLM(LlamaConfig(**{**CFG, "vocab_size": 300})).reset_parameters(seed=2)
    emb = model.get_input_embeddings().weight
    ids = tok.encode("the lazy dog")
    expect = emb[(ids * 8)[:8]]
    cfg = PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="TEXT", prompt_tuning_init_text="the lazy dog",
                             tokenizer_name_or_path=str(tmp_path / "tokenizer.model"))
    assert torch.equal(get_peft_model(model, cfg).prompt().detach(), expect)
    model.name_or_path = str(tmp_path)  # a checkpoint folder holding tokenizer.model is found by itself
    cfg = PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="TEXT", prompt_tuning_init_text="the lazy dog")
    assert torch.equal(get_peft_model(model, cfg).prompt().detach(), expect)
    # VOCAB: the first ordinary pieces, after <unk> <s> </s> <pad> and the 256 byte pieces
    first = 4 + 256
    assert tok.id_to_piece(first - 1) == "<0xFF>"
    cfg = PromptTuningConfig(num_virtual_tokens=8, prompt_tuning_init="VOCAB", vocab_top_k=10, tokenizer=tok)
    for r in get_peft_model(model, cfg).prompt().detach():
        assert any(torch.equal(r, emb[i]) for i in range(first, first + 10))
