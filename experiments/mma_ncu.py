"""Target for Nsight Compute: the small-M mma kernel on one shape, pinned tile, launched 12 times.

    ncu --kernel-name regex:_mm4_mma --launch-skip 10 --launch-count 1 \
        --section WarpStateStats --section SchedulerStats python experiments/mma_ncu.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftlab.kernels import matmul4bit as mm  # noqa: E402
from peftlab.quant import quantize_4bit  # noqa: E402

N, K = (int(v) for v in (sys.argv[1:3] if len(sys.argv) > 2 else (28672, 8192)))
cfg = tuple(int(v) for v in sys.argv[3].split(",")) if len(sys.argv) > 3 else (4, 2, 4)
w = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
packed, st = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
for _ in range(12):
    mm.matmul4bit_forward(x, packed, st.code, st.absmax, N, K, 64, absmax2=st.absmax2,
                          code2=st.code2, offset=st.offset, config=("mma",) + cfg)
torch.cuda.synchronize()
print("done", N, K, cfg)
