"""How much of a LoRA training step is LoRA? Base model vs LoRA model, peftlab vs transformers+PEFT.

On bench_lora.py's config (Llama hidden 256, 6 layers, intermediate 688, 8 heads, vocab 2048,
batch 8 x seq 256, LoRA r=8 on all linear layers, fp32, CPU) this times forward + backward with
bench_lora's loss, interleaved, median of 6 rounds:

  ours base   peftlab's model without adapters, gradients flowing through every layer (the
              embedding table requires grad, so that backward runs the whole network)
  hf base     the HF PEFT model with its adapters disabled, embedding table requiring grad
  ours lora   peftlab LoRA model      hf lora   transformers + PEFT LoRA model

The LoRA overhead of each library is (lora - base) / base; the speed-up bench_lora reports is
bounded by (hf lora) / (ours base) when peftlab's LoRA overhead reaches zero.

    python experiments/lora_overhead_probe.py [--threads 1]      # 2-core CPU: ~1 minute
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_lora as bl  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    args = argparse.Namespace(vocab=2048, hidden=256, intermediate=688, layers=6, heads=8, seq=256, r=8)
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf, base = bl.build_models(args, Path(tmp))
    ids = torch.randint(0, args.vocab, (8, args.seq), generator=torch.Generator().manual_seed(0))
    for p in base.parameters():
        p.requires_grad_(False)

    def with_embedding_grad(embedding, run):
        embedding.weight.requires_grad_(True)
        run()
        embedding.weight.grad = None
        embedding.weight.requires_grad_(False)

    def hf_base():
        with hf.disable_adapter():
            bl.lm_loss(hf(input_ids=ids, use_cache=False).logits, ids).backward()
        hf.zero_grad(set_to_none=True)

    fns = {
        "ours base": lambda: with_embedding_grad(
            base.model.embed_tokens, lambda: bl.lm_loss(base(ids), ids).backward()),
        "hf base": lambda: with_embedding_grad(hf.get_base_model().model.embed_tokens, hf_base),
        "ours lora": lambda: (bl.lm_loss(ours(ids), ids).backward(), ours.zero_grad(set_to_none=True)),
        "hf lora": lambda: (bl.lm_loss(hf(input_ids=ids, use_cache=False).logits, ids).backward(),
                            hf.zero_grad(set_to_none=True)),
    }
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(a.rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"torch {torch.__version__}, {a.threads} thread(s), forward + backward, median of {a.rounds}")
    for k, v in med.items():
        print(f"  {k:10s} {v:7.1f} ms")
    print(f"  LoRA overhead: peftlab {med['ours lora'] / med['ours base'] - 1:+.0%}, "
          f"transformers+PEFT {med['hf lora'] / med['hf base'] - 1:+.0%}; "
          f"hf lora / ours lora {med['hf lora'] / med['ours lora']:.2f}x, "
          f"hf lora / ours base {med['hf lora'] / med['ours base']:.2f}x (bound at zero overhead)")


if __name__ == "__main__":
    main()
