"""Prompt methods on the 4-bit base (QLoRA-style): frozen packed weights, gradients reach only prompts."""
import pytest
import torch

import peftlab
from peftlab.models import load_pretrained
from peftlab.quant.linear4bit import Linear4bit

CONFIGS = {
    "prompt_tuning": lambda: peftlab.PromptTuningConfig(num_virtual_tokens=4),
    "p_tuning": lambda: peftlab.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=32),
    "prefix_tuning": lambda: peftlab.PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=32),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prompt_methods_train_on_the_nf4_base(name):
    base, tok = load_pretrained("peftlab/assets/base-tiny", quantize="nf4")
    assert isinstance(base.model.layers[0].self_attn.q_proj, Linear4bit)
    packed = {n: b.clone() for n, b in base.named_buffers() if b.dtype == torch.uint8}
    model = peftlab.get_peft_model(base, CONFIGS[name]())
    ids = torch.tensor([tok.encode("Nushsae Teizim plays the", bos=True)] * 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits = model(ids)
    assert logits.shape == (2, ids.shape[1], 2048)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 2048), ids[:, 1:].reshape(-1))
    loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("prompt" in n or "prefix" in n for n in trainable)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and set(changed) <= set(trainable)
    for n, b in base.named_buffers():
        if n in packed:
            assert torch.equal(b, packed[n]), n
    out = model.generate(ids[:1], max_new_tokens=3)
    assert out.shape == (1, 3)
