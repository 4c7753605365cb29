"""Datasets: formats (alpaca, sharegpt, openai, text), collation, and the synthetic world.

    from peftlab.data import load_dataset, encode_example, Collator
    from peftlab.data.synthworld import load_task, write_world
"""
from .collate import (IGNORE_INDEX, Collator, TokenizedDataset, encode_example, encode_prompt,
                      pack_examples, reference_answer)
from .formats import Example, LoadReport, Message, load_dataset, parse_record
from .match import exact_match, normalize_answer

__all__ = ["IGNORE_INDEX", "Collator", "TokenizedDataset", "encode_example", "encode_prompt",
           "pack_examples", "reference_answer", "Example", "LoadReport", "Message", "load_dataset",
           "parse_record", "exact_match", "normalize_answer"]
