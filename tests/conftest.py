"""Test-wide settings.

Triton kernels run interpreted on the CPU (TRITON_INTERPRET=1) when no GPU is present; the
variable must be set before triton compiles any `@triton.jit` function, hence here, first.
"""
import os

try:
    import torch as _torch

    _HAS_CUDA = _torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # the GEMV tile is otherwise chosen by timing every candidate (a compile each) per new shape;
    # tests pin tiles where the tile matters and the benchmark checks every tuned choice
    os.environ.setdefault("PEFTLAB_GEMV_TUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests name repository files (shipped bases, configs) relative to the repository root.
os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Llama (hidden 32, 2 layers, vocab 2048) saved with the project tokenizer."""
    from peftlab.models import LlamaConfig, LlamaForCausalLM, save_pretrained
    from peftlab.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("base")
    cfg = LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=256, pad_token_id=3)
    save_pretrained(LlamaForCausalLM(cfg).reset_parameters(seed=0), d,
                    tokenizer=Tokenizer.load("peftlab/assets/tokenizer/tokenizer.model"))
    return d
