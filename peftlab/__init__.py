"""peftlab: parameter-efficient fine-tuning, written to be read, tested and measured.

The public API (see DESIGN.md):

    model, tok = peftlab.load_pretrained(path, dtype=torch.float32, device="cpu", quantize=None)
    model = peftlab.get_peft_model(model, peftlab.LoraConfig(r=8, lora_alpha=16,
                                                             target_modules=["q_proj", "v_proj"]))
    peftlab.save_adapter(model, out_dir); model = peftlab.load_adapter(base, out_dir)
    peftlab.merge_adapter(model); peftlab.unmerge_adapter(model); peftlab.merge_and_unload(model)

Names are resolved lazily so that `import peftlab` stays cheap and submodules import only what
they use.
"""
from .errors import PeftlabError

__version__ = "0.1.0"

_LAZY = {
    "load_pretrained": "peftlab.models.hf_io",
    "save_pretrained": "peftlab.models.hf_io",
    "LlamaConfig": "peftlab.models.llama",
    "LlamaForCausalLM": "peftlab.models.llama",
    "Tokenizer": "peftlab.tokenizer",
    "get_peft_model": "peftlab.tuners",
    "save_adapter": "peftlab.tuners.io",
    "load_adapter": "peftlab.tuners.io",
    "merge_adapter": "peftlab.tuners",
    "unmerge_adapter": "peftlab.tuners",
    "merge_and_unload": "peftlab.tuners",
    "trainable_parameters_report": "peftlab.tuners",
    "LoraConfig": "peftlab.tuners.config",
    "PromptTuningConfig": "peftlab.tuners.config",
    "PTuningConfig": "peftlab.tuners.config",
    "PrefixTuningConfig": "peftlab.tuners.config",
    "FreezeConfig": "peftlab.tuners.config",
    "BitFitConfig": "peftlab.tuners.config",
}

__all__ = ["PeftlabError", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'peftlab' has no attribute '{name}'")
