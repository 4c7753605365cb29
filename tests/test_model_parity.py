"""The Llama-family model against transformers (test-only oracle), in float32."""
import json

import pytest
import torch

import peftlab
from peftlab.errors import CheckpointError, ConfigError, PeftlabError
from peftlab.models import LlamaConfig, LlamaForCausalLM, load_pretrained, save_pretrained
from peftlab.models.hf_io import config_from_dict

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5)

CASES = {
    "llama_gqa": ("llama", dict(num_key_value_heads=2)),
    "llama_tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama_biases": ("llama", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "llama3_rope": ("llama", dict(num_key_value_heads=1, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama_linear_rope": ("llama", dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama_head_dim": ("llama", dict(num_key_value_heads=2, head_dim=32)),
    "qwen2": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral_window": ("mistral", dict(num_key_value_heads=2, sliding_window=5, head_dim=16)),
}


def _hf_model(kind, extra, seed=0):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[kind]
    cfg = cls(**BASE, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # biases and norms are zero/one at init; randomise everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.float().eval()


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    kind, extra = CASES[request.param]
    hf = _hf_model(kind, extra)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    ours, tok = load_pretrained(d, dtype=torch.float32)
    return request.param, hf, ours.eval(), d


def test_logits_match_transformers(pair):
    name, hf, ours, _ = pair
    ids = torch.randint(0, BASE["vocab_size"], (3, 11))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids)
    assert got.shape == (3, 11, BASE["vocab_size"])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_matches_transformers_positions(pair):
    name, hf, ours, _ = pair
    ids = torch.randint(0, BASE["vocab_size"], (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], ref[keep], atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_matches_full_forward(pair):
    _, _, ours, _ = pair
    ids = torch.randint(0, BASE["vocab_size"], (2, 10))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_kv_cache()
        parts = [ours(ids[:, :6], kv_cache=cache)]
        for t in range(6, 10):
            parts.append(ours(ids[:, t:t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_matches_transformers(pair):
    name, hf, ours, _ = pair
    ids = torch.randint(3, BASE["vocab_size"], (1, 7))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)[:, 7:]
        got = ours.generate(ids, max_new_tokens=8)
    assert torch.equal(got, ref)


def test_our_save_loads_in_transformers(pair, tmp_path):
    name, hf, ours, _ = pair
    save_pretrained(ours, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    ids = torch.randint(0, BASE["vocab_size"], (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ours(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 4])  # Mistral's sliding window over cache + left padding
def test_batched_left_padded_generation_equals_single_rows(window):
    cfg = LlamaConfig(**BASE, num_key_value_heads=2, sliding_window=window)
    model = LlamaForCausalLM(cfg).reset_parameters(seed=1).eval()
    a = torch.randint(3, 97, (5,))
    b = torch.randint(3, 97, (8,))
    batch = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    batch[0, 3:], mask[0, 3:] = a, 1
    batch[1], mask[1] = b, 1
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6)
    assert torch.equal(out[0], model.generate(a[None], max_new_tokens=6)[0])
    assert torch.equal(out[1], model.generate(b[None], max_new_tokens=6)[0])


class _CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def new_kv_cache(self):
        return self.model.new_kv_cache()

    def forward(self, **kw):
        self.calls += 1
        return self.model(**kw)


def test_generate_runs_once_per_new_token_and_stops_at_eos():
    from peftlab.models import generate

    model = LlamaForCausalLM(LlamaConfig(**BASE)).reset_parameters(seed=6).eval()
    ids = torch.randint(3, 97, (2, 5))
    counting = _CountingModel(model)
    ref = generate(counting, ids, max_new_tokens=4)
    assert ref.shape == (2, 4) and counting.calls == 4  # prefill + 3 cached steps, none wasted
    counting.calls = 0
    assert generate(counting, ids, max_new_tokens=0).shape == (2, 0) and counting.calls == 0
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 0"):
        generate(model, ids, max_new_tokens=-1)
    # a row that emits eos is padded from then on; the others go on
    eos = int(ref[0, 1])
    out = generate(model, ids, max_new_tokens=4, eos_token_id=eos, pad_token_id=0)
    stop = int((ref[0] == eos).nonzero()[0])
    assert out[0, :stop + 1].tolist() == ref[0, :stop + 1].tolist() and set(out[0, stop + 1:].tolist()) <= {0}
    # when every row has emitted eos, decoding stops
    same = ids[:1].expand(2, -1)
    counting.calls = 0
    first = int(ref[0, 0])
    assert generate(counting, same, max_new_tokens=4, eos_token_id=first).tolist() == [[first], [first]]
    assert counting.calls == 1


def test_low_precision_cast_keeps_float32_rotary_table():
    from peftlab.models.llama import rope_inverse_frequencies

    cfg = LlamaConfig(**BASE, rope_theta=500000.0)
    model = LlamaForCausalLM(cfg).reset_parameters(seed=0).to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.inv_freq, rope_inverse_frequencies(cfg))
    # cos/sin are built in float32 from it: the angle at position 4000 is exact, not off by ~16 rad
    cos, _ = model.rotary(torch.tensor([[4000]]), torch.float32)
    torch.testing.assert_close(cos[0, 0, 0, 1], torch.cos(4000 * rope_inverse_frequencies(cfg)[1]))


def test_sampling_is_seeded_and_respects_top_k():
    cfg = LlamaConfig(**BASE)
    model = LlamaForCausalLM(cfg).reset_parameters(seed=2).eval()
    ids = torch.randint(3, 97, (2, 4))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s1 = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=3, generator=g1)
    s2 = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=3, generator=g2)
    assert torch.equal(s1, s2)
    # top_k=1 sampling is greedy
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=True, top_k=1, generator=g),
                       model.generate(ids, max_new_tokens=5))


def test_gradient_checkpointing_gives_same_gradients():
    cfg = LlamaConfig(**BASE, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).reset_parameters(seed=3).train()
    ids = torch.randint(0, 97, (2, 6))
    model(ids).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-6)


def test_failed_save_keeps_the_previous_checkpoint_and_no_stale_files(tmp_path, monkeypatch):
    import safetensors.torch

    from peftlab.models.hf_io import _parse_size

    cfg = LlamaConfig(**BASE, num_key_value_heads=2)
    old = LlamaForCausalLM(cfg).reset_parameters(seed=4).eval()
    save_pretrained(old, tmp_path)
    real, calls = safetensors.torch.save, {"n": 0}

    def dies_on_third_shard(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(safetensors.torch, "save", dies_on_third_shard)
    new = LlamaForCausalLM(cfg).reset_parameters(seed=5).eval()
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(new, tmp_path, max_shard_size=20_000)  # dies while writing shards
    monkeypatch.setattr(safetensors.torch, "save", real)
    ids = torch.randint(0, 97, (1, 5))
    assert torch.equal(load_pretrained(tmp_path)[0](ids), old(ids))  # the old file is still whole
    save_pretrained(new, tmp_path, max_shard_size=20_000)
    assert torch.equal(load_pretrained(tmp_path)[0](ids), new(ids))
    save_pretrained(old, tmp_path)  # sharded -> one file: the shards and the index go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(load_pretrained(tmp_path)[0](ids), old(ids))
    assert _parse_size("2GB") == 2 * 10**9 and _parse_size("1GiB") == 2**30 and _parse_size(500) == 500
    with pytest.raises(ConfigError, match="max_shard_size 'lots'"):
        save_pretrained(new, tmp_path, max_shard_size="lots")


def test_sharded_save_and_load_roundtrip(tmp_path):
    cfg = LlamaConfig(**BASE, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).reset_parameters(seed=4).eval()
    save_pretrained(model, tmp_path, max_shard_size=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    back, _ = load_pretrained(tmp_path)
    ids = torch.randint(0, 97, (1, 5))
    assert torch.equal(back(ids), model(ids))
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_meta_device_parameter_count():
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4)  # TinyLlama-1.1B
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.num_parameters == 1_100_048_384


# --- bad checkpoints --------------------------------------------------------------------------
@pytest.fixture
def good_dir(tmp_path):
    cfg = LlamaConfig(**BASE, num_key_value_heads=2)
    save_pretrained(LlamaForCausalLM(cfg).reset_parameters(seed=0), tmp_path)
    return tmp_path


def _rewrite(path, fn):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path))


def test_missing_tensor_is_named(good_dir):
    _rewrite(good_dir / "model.safetensors", lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(good_dir)


def test_extra_tensor_is_named(good_dir):
    _rewrite(good_dir / "model.safetensors", lambda sd: sd.__setitem__("model.layers.9.foo.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.9\.foo\.weight'"):
        load_pretrained(good_dir)


def test_wrong_shape_is_named(good_dir):
    _rewrite(good_dir / "model.safetensors",
             lambda sd: sd.__setitem__("model.layers.0.self_attn.q_proj.weight", torch.zeros(64, 63)))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \(64, 63\)"):
        load_pretrained(good_dir)


def test_truncated_file_is_named(good_dir):
    f = good_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load_pretrained(good_dir)


def test_unknown_model_type_and_field(good_dir):
    cfg = json.loads((good_dir / "config.json").read_text())
    (good_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"config\.json: model_type 'gpt2' is not supported"):
        load_pretrained(good_dir)
    (good_dir / "config.json").write_text(json.dumps({**cfg, "alibi": True}))
    with pytest.raises(ConfigError, match=r"config\.json: unsupported config field\(s\) alibi"):
        load_pretrained(good_dir)
    (good_dir / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4}}))
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn'"):
        load_pretrained(good_dir)
    (good_dir / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "llama3", "factor": 8}}))
    with pytest.raises(ConfigError, match=r"config\.json: rope_scaling of type 'llama3' lacks low_freq_factor, "
                                          "high_freq_factor, original_max_position_embeddings"):
        load_pretrained(good_dir)
    layers = ["full_attention", "sliding_attention"]
    (good_dir / "config.json").write_text(json.dumps({**cfg, "sliding_window": 4, "layer_types": layers}))
    with pytest.raises(ConfigError, match=r"config\.json: field 'layer_types' mixes full and sliding"):
        load_pretrained(good_dir)


def test_errors_share_one_base(good_dir):
    with pytest.raises(PeftlabError):
        load_pretrained(good_dir / "nope")
    assert issubclass(CheckpointError, peftlab.PeftlabError)


def test_transformers_v5_rope_parameters_are_read():
    cfg = config_from_dict({**BASE, "model_type": "llama", "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}})
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling["rope_type"] == "llama3"
