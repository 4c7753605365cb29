"""Llama-family decoder (llama.py), decoding (generation.py), Hugging Face files (hf_io.py)."""
from .llama import KVCache, LlamaConfig, LlamaForCausalLM
from .hf_io import load_pretrained, save_pretrained
from .generation import generate

__all__ = ["KVCache", "LlamaConfig", "LlamaForCausalLM", "load_pretrained", "save_pretrained", "generate"]
