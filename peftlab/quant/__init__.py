"""4-bit (NF4 / FP4) and blockwise 8-bit quantization, bitsandbytes-compatible.

    from peftlab.quant import quantize_4bit, dequantize_4bit, QuantState, Linear4bit
    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    w_hat = dequantize_4bit(packed, state)            # shape and dtype of w

Files: ``codes.py`` (NF4/FP4/Int4 tables, the 8-bit dynamic map), ``blockwise8.py`` (8-bit
blockwise quantization, also used by the paged 8-bit optimizer), ``functional.py`` (4-bit
reference + dispatch to the Triton kernels in ``peftlab.kernels.quant4bit``), ``state.py``
(QuantState and bitsandbytes state-dict keys), ``linear4bit.py`` (the frozen 4-bit Linear).
"""
from .blockwise8 import (dequantize_blockwise_8bit, dequantize_blockwise_8bit_reference,
                         quantize_blockwise_8bit, quantize_blockwise_8bit_reference)
from .codes import dynamic_map, fp4_code, get_code, int4_code, nf4_code
from .functional import (dequantize_4bit, dequantize_4bit_reference, quantize_4bit,
                         quantize_4bit_reference)
from .linear4bit import Linear4bit
from .state import NestedState, QuantState, load_weight_state_dict, weight_state_dict

__all__ = [
    "quantize_4bit", "dequantize_4bit", "quantize_4bit_reference", "dequantize_4bit_reference",
    "quantize_blockwise_8bit", "dequantize_blockwise_8bit", "quantize_blockwise_8bit_reference",
    "dequantize_blockwise_8bit_reference", "QuantState", "NestedState", "weight_state_dict",
    "load_weight_state_dict", "nf4_code", "fp4_code", "int4_code", "get_code", "dynamic_map",
    "Linear4bit",
]
