"""Identities of LoRA and its variants that hold exactly (float64), whatever the scale."""
import math

import pytest
import torch

from peftlab.models import LlamaConfig, LlamaForCausalLM
from peftlab.tuners import get_peft_model
from peftlab.tuners.lora import LoraConfig, lora_layers, merge_adapter, set_adapter, unmerge_adapter
from peftlab.tuners.lora_layers import LoraLinear

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny(seed=0, **extra):
    return LlamaForCausalLM(LlamaConfig(**TINY, **extra)).reset_parameters(seed=seed).double().eval()


def ids(seed=0, shape=(2, 9)):
    return torch.randint(0, TINY["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def randomize_B(model, std=0.3):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_magnitude" in n:
                p.add_(torch.randn_like(p) * std)


# --- B = 0: the adapted model starts at the base model ------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(init_lora_weights="gaussian"), dict(use_dora=True),
                                dict(use_rslora=True, use_dora=True), dict(target_modules=["embed_tokens", "o_proj"])])
def test_zero_B_leaves_output_bit_identical(kw):
    base = tiny()
    x = ids()
    ref = base(x)
    kw = {"target_modules": "all-linear", **kw}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **kw))
    assert torch.equal(model(x), ref)


# --- merge / unmerge ----------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_merge_agrees_and_unmerge_restores_W0_bit_for_bit(dora):
    model = tiny(attention_bias=True, mlp_bias=True)
    W0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora))
    # two adapters active at once: their terms add, merged or not
    get_peft_model(model, LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "down_proj"], use_dora=dora), "b")
    set_adapter(model, ["default", "b"])
    randomize_B(model)
    x = ids()
    out = model(x)
    merge_adapter(model)
    assert all(layer.merged_adapters for _, layer in lora_layers(model))
    torch.testing.assert_close(model(x), out, atol=1e-12, rtol=1e-12)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight,
                           W0["model.layers.0.self_attn.q_proj.weight"])
    unmerge_adapter(model)
    for n, p in model.named_parameters():
        key = n.replace(".base_layer", "")
        if key in W0:
            assert torch.equal(p, W0[key]), n
    assert torch.equal(model(x), out)


# --- LoRA paper, Table 15: trainable parameters on GPT-3 175B -----------------------------------
GPT3 = dict(vocab_size=50257, hidden_size=12288, intermediate_size=4 * 12288, num_hidden_layers=96,
            num_attention_heads=96, max_position_embeddings=2048)
TABLE15 = [  # (adapted matrices, r, "# Trainable Parameters" as printed, in millions)
    (["v_proj"], 2, 4.7), (["q_proj", "v_proj"], 1, 4.7), (["q_proj", "v_proj"], 2, 9.4),
    (["q_proj", "k_proj", "v_proj", "o_proj"], 1, 9.4), (["q_proj", "v_proj"], 4, 18.8),
    (["q_proj", "k_proj", "v_proj", "o_proj"], 2, 18.8), (["q_proj", "v_proj"], 8, 37.7),
    (["q_proj", "k_proj", "v_proj", "o_proj"], 4, 37.7), (["q_proj", "v_proj"], 64, 301.9),
    (["q_proj", "k_proj", "v_proj", "o_proj"], 64, 603.8),
]


@pytest.mark.parametrize("targets,r,paper_m", TABLE15)
def test_gpt3_table15_parameter_counts(targets, r, paper_m):
    """|Θ| = 2 · L · d_model · r per adapted matrix type (Hu et al. 2021, §4.2 and Table 15).

    The table prints millions truncated, not rounded (18,874,368 is "18.8 M"), and its last row
    (603,979,776) as "603.8 M", twice the truncated 301.9; we allow 0.2 M for that.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**GPT3))
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=targets))
    n = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    assert n == 2 * 96 * 12288 * r * len(targets)
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(n / 1e6 - paper_m) <= 0.2
    if (targets, r) == (["q_proj", "v_proj"], 1):
        assert n == 4_718_592
    if r == 64 and len(targets) == 4:
        assert n == 603_979_776


# --- §4.1: tuning alpha is tuning the learning rate (Adam) --------------------------------------
def _adam_trajectory(alpha, lr, eps, scale_init, c_init, steps=5, seed=0):
    """ΔW = s B A of every adapted layer after each Adam step on a fixed batch."""
    model = get_peft_model(tiny(seed), LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            A.copy_(torch.randn_like(A) * 0.2)
            if scale_init:
                B.copy_(torch.randn_like(B) * 0.2)
            A.div_(math.sqrt(c_init))
            B.div_(math.sqrt(c_init))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, eps=eps)
    x = ids(3, (2, 12))
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        logits = model(x)  # float64 throughout (token_loss_sum would compute the loss in float32)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        traj.append(torch.cat([(layer.scaling["default"] * layer.lora_weight("default")).flatten()
                               for _, layer in lora_layers(model)]).detach())
    return traj


@pytest.mark.parametrize("c", [4.0, 3.0])
def test_alpha_times_c_equals_lr_over_sqrt_c_under_adam(c):
    """Hu et al. 2021, §4.1: "tuning α is roughly the same as tuning the learning rate if we scale
    the initialization appropriately". Precisely: with Adam, weight decay 0 and eps = 0,

        (α, lr, A0, B0)  and  (c α, lr / √c, A0 / √c, B0 / √c)

    give the same ΔW = (α/r) B A after every step. Proof: the map keeps ΔW (c · (1/√c)² = 1), so
    the loss is the same; ∂L/∂A' = s' B'ᵀ Gᵀ X = √c ∂L/∂A and likewise ∂L/∂B' = √c ∂L/∂B; Adam's
    step m̂ / sqrt(v̂) does not see a constant gradient factor when eps = 0; so A' and B' move by
    lr/√c times the same direction, which keeps A' = A/√c and B' = B/√c; by induction for all t.
    One learning rate for both forces the same factor on A and B, hence 1/√c each (B0 = 0 needs
    no scaling; then Adam's eps must scale too, eps' = √c eps, because ∂L/∂A = 0 at step 1 and
    eps = 0 would divide 0 by 0). For c = 4 every scaling is a power of two and the two
    trajectories agree bit for bit.
    """
    ref = _adam_trajectory(alpha=8.0, lr=1e-2, eps=0.0, scale_init=True, c_init=1.0)
    got = _adam_trajectory(alpha=8.0 * c, lr=1e-2 / math.sqrt(c), eps=0.0, scale_init=True, c_init=c)
    assert not torch.equal(ref[0], ref[-1])
    for a, b in zip(ref, got):
        if c == 4.0:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)
    # standard init (B0 = 0): only A0 scales, and eps with the gradients
    ref = _adam_trajectory(alpha=8.0, lr=1e-2, eps=1e-8, scale_init=False, c_init=1.0)
    got = _adam_trajectory(alpha=8.0 * c, lr=1e-2 / math.sqrt(c), eps=1e-8 * math.sqrt(c), scale_init=False, c_init=c)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)
    # and without the init scaling the trajectories differ: the equivalence needs all three
    bad = _adam_trajectory(alpha=8.0 * c, lr=1e-2 / math.sqrt(c), eps=0.0, scale_init=True, c_init=1.0)
    assert (bad[-1] - ref[-1]).abs().max() > 1e-3


# --- rsLoRA: the rank-stable scaling ------------------------------------------------------------
def test_rslora_gradient_of_B_is_rank_stable():
    """Kalajdzievski 2023 (arXiv 2312.03732, §3, its main theorem): with A's entries i.i.d. of
    variance σ² independent of r and B = 0, the adapters are rank-stabilized (activations and
    gradients Θ(1) as r grows) iff the scale γ_r ∈ Θ(1/√r).

    At initialisation ∂L/∂B = γ_r Gᵀ X Aᵀ (G = ∂L/∂h [n, out], X [n, in]), checked here against
    autograd, so ||∂L/∂B||²_F = γ_r² Σ_i ||Gᵀ X a_i||² over the r rows a_i, and because
    E[a aᵀ] = σ² I:  E ||∂L/∂B||²_F = γ_r² · r · σ² · ||Gᵀ X||²_F.
    With γ = α/√r (rsLoRA) this is α² σ² ||GᵀX||² for every r; with γ = α/r it is r times
    smaller, i.e. it decays as 1/r. For the same A the two gradients differ by exactly √r.
    The expectation is estimated with PEFT's Kaiming-uniform A (σ² = 1/(3 d_in)), seeded.
    """
    d_in, d_out, n, alpha = 16, 8, 5, 8.0
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
    G = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
    M = G.T @ X                                              # [out, in]
    sigma2 = 1.0 / (3 * d_in)                                # U(±1/sqrt(d_in))
    # (1) the gradient formula, on our layer
    for rs in (False, True):
        layer = LoraLinear(torch.nn.Linear(d_in, d_out).double())
        layer.update_layer("a", LoraConfig(r=4, lora_alpha=alpha, use_rslora=rs))
        layer.set_active(["a"])
        (layer(X) * G).sum().backward()
        A = layer.lora_A["a"].weight.detach()
        torch.testing.assert_close(layer.lora_B["a"].weight.grad, layer.scaling["a"] * M @ A.T)
    # (2) the expectation over A, for r = 1 .. 64
    per_r = {}
    for r in (1, 4, 16, 64):
        draws = 20000 // r
        A = (torch.rand(draws, r, d_in, generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(d_in)
        sq = (torch.einsum("oi,dri->dor", M, A) ** 2).sum((1, 2)).mean()   # E||M Aᵀ||², γ = 1
        closed = r * sigma2 * (M ** 2).sum()
        assert abs(sq / closed - 1) < 0.05
        per_r[r] = sq
    for r, sq in per_r.items():
        rs_norm2 = (alpha / math.sqrt(r)) ** 2 * sq       # rsLoRA: flat in r
        lora_norm2 = (alpha / r) ** 2 * sq                # LoRA: ∝ 1/r
        assert abs(rs_norm2 / ((alpha ** 2) * per_r[1]) - 1) < 0.1
        assert abs(lora_norm2 * r / ((alpha ** 2) * per_r[1]) - 1) < 0.1
        assert math.isclose(math.sqrt(rs_norm2 / lora_norm2), math.sqrt(r))


# --- DoRA and PiSSA initialisations ---------------------------------------------------------------
def test_dora_magnitude_starts_at_row_norms_and_merge_is_exact():
    """m0 = ||W0|| per output row, so W' = m ⊙ W0/||W0|| = W0 at init (DoRA §4.1 eq. 5)."""
    model = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj", "gate_proj"], use_dora=True))
    for _, layer in lora_layers(model):
        W = layer.base_layer.weight
        assert torch.equal(layer.lora_magnitude_vector["default"], torch.linalg.norm(W, dim=1))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3"])
def test_pissa_residual_plus_adapter_is_W_and_output_unchanged(init):
    base = tiny()
    W = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(("q_proj", "up_proj"))}
    x = ids()
    ref = base(x)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                            init_lora_weights=init))
    torch.testing.assert_close(model(x), ref, atol=1e-12, rtol=1e-12)
    for name, layer in lora_layers(model):
        s, A, B = layer.scaling["default"], layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(layer.base_layer.weight + s * B @ A, W[name], atol=1e-14, rtol=0)
        if init == "pissa":  # s B A is the best rank-r approximation: U_r S_r V_rᵀ
            S = torch.linalg.svdvals(W[name])
            torch.testing.assert_close(torch.linalg.svdvals(s * B @ A)[:4], S[:4])
            torch.testing.assert_close(torch.linalg.svdvals(layer.base_layer.weight)[:4], S[4:8])
            torch.testing.assert_close(A @ A.T, torch.diag(S[:4] / s))    # A = sqrt(S/s) Vᵀ
            torch.testing.assert_close(B.T @ B, torch.diag(S[:4] / s))    # B = U sqrt(S/s)
