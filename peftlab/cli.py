"""`peftlab <verb>`: pretrain, train, eval, generate, merge, demo, bench.

    peftlab demo                                   fine-tune the shipped base, before/after table
    peftlab train CONFIG.yaml [key=value ...]      any method; see experiments/configs/
    peftlab pretrain CONFIG.yaml [key=value ...]   a base model from scratch on the synthetic world
    peftlab eval --model M [--adapter A] --task T  held-out loss, perplexity and accuracy
    peftlab generate --model M [--adapter A] TEXT  greedy or sampled continuation
    peftlab merge BASE ADAPTER OUT                 a merged Hugging Face checkpoint
    peftlab bench kernels|quant|optim|lora         benchmark scripts under experiments/

Errors a user can cause print as one line (`peftlab: error: ...`) with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

from .errors import PeftlabError

REPO = Path(__file__).resolve().parent.parent


def _load_model_and_adapter(model: str, adapter: Optional[str], quantize: Optional[str] = None, device: str = "auto"):
    import torch

    from .models import load_pretrained
    from .train.trainer import resolve_device, resolve_model_path

    dev = resolve_device(device)
    m, tok = load_pretrained(resolve_model_path(model), dtype=torch.float32, device=dev, quantize=quantize)
    if adapter:
        from .tuners.io import load_adapter

        m = load_adapter(m, adapter)
    if tok is None:
        raise PeftlabError(f"{model}: no tokenizer.model found")
    return m.eval(), tok


def cmd_train(args) -> int:
    from .train import load_train_config, train
    from .train.export import export_final

    cfg = load_train_config(args.config, args.overrides)
    if os.environ.get("WORLD_SIZE") and int(os.environ["WORLD_SIZE"]) > 1 or cfg.distributed != "none":
        from .train.distributed import run_distributed

        return run_distributed(cfg)
    res = train(cfg)
    out = export_final(res, cfg)
    _print_eval(res.eval)
    print(f"[peftlab] run directory: {res.run_dir}  (final weights: {out})")
    return 0


def cmd_pretrain(args) -> int:
    from .train.pretrain import pretrain

    pretrain(args.config, args.overrides)
    return 0


def _print_eval(ev) -> None:
    if not ev:
        return
    parts = [f"loss {ev['loss']:.4f}", f"ppl {ev['ppl']:.3f}"]
    if "accuracy" in ev:
        parts.append(f"accuracy {ev['accuracy']:.3f} (n={ev['n']})")
    print("[peftlab] eval: " + ", ".join(parts))


def cmd_eval(args) -> int:
    from .data.synthworld import load_task
    from .train.evaluate import evaluate_accuracy, evaluate_loss

    model, tok = _load_model_and_adapter(args.model, args.adapter, args.quantize, args.device)
    if args.file:
        from .data.formats import load_dataset

        examples = list(load_dataset(args.file))
    else:
        examples = list(load_task(args.task, args.split))
    examples = examples[: args.limit] if args.limit else examples
    ev = evaluate_loss(model, tok, examples, template=args.template)
    if examples and not examples[0].is_text:
        ev.update(evaluate_accuracy(model, tok, examples, template=args.template))
    _print_eval(ev)
    print(json.dumps({k: v for k, v in ev.items() if k != "samples"}))
    return 0


def cmd_generate(args) -> int:
    import torch

    from .data.formats import Example, Message
    from .data.collate import encode_prompt
    from .models.generation import generate

    model, tok = _load_model_and_adapter(args.model, args.adapter, args.quantize, args.device)
    if args.chat:
        ids = encode_prompt(tok, Example(messages=[Message("user", args.text), Message("assistant", "")]),
                            template=args.template)
    else:
        ids = tok.encode(args.text, bos=True)
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(args.seed)
    out = generate(model, torch.tensor([ids], device=dev), max_new_tokens=args.max_new_tokens,
                   do_sample=args.temperature > 0, temperature=max(args.temperature, 1e-6), top_k=args.top_k,
                   top_p=args.top_p, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, generator=g)
    row = out[0].tolist()
    if tok.eos_id in row:
        row = row[: row.index(tok.eos_id)]
    print(tok.decode(row))
    return 0


def cmd_merge(args) -> int:
    from .train.trainer import resolve_model_path
    from .tuners.merge import merge_to_checkpoint

    out = merge_to_checkpoint(resolve_model_path(args.base), args.adapter, args.out)
    print(f"[peftlab] merged checkpoint written to {out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(output_dir=args.output_dir, steps=args.steps, method=args.method)
    return 0


def cmd_bench(args) -> int:
    import runpy

    script = REPO / "experiments" / f"bench_{args.what}.py"
    if not script.is_file():
        raise PeftlabError(f"{script}: benchmark script not found (benchmarks run from a source checkout)")
    sys.argv = [str(script)] + args.rest
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftlab", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="fine-tune with any method from a YAML config")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="key=value (nested keys with dots: peft.r=16)")
    t.set_defaults(fn=cmd_train)

    t = sub.add_parser("pretrain", help="train a base model from scratch on the synthetic world")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*")
    t.set_defaults(fn=cmd_pretrain)

    def model_args(q):
        q.add_argument("--model", default="small", help="checkpoint dir or shipped base (tiny, small, small-bias)")
        q.add_argument("--adapter", default=None)
        q.add_argument("--quantize", default=None, choices=["nf4", "fp4"])
        q.add_argument("--device", default="auto")
        q.add_argument("--template", default="default")

    e = sub.add_parser("eval", help="loss, perplexity and exact-match accuracy on a task or file")
    model_args(e)
    e.add_argument("--task", default="qa")
    e.add_argument("--split", default="test")
    e.add_argument("--file", default=None)
    e.add_argument("--limit", type=int, default=200)
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="continue a text (or answer it with --chat)")
    model_args(g)
    g.add_argument("text")
    g.add_argument("--chat", action="store_true")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=cmd_generate)

    m = sub.add_parser("merge", help="merge a LoRA adapter into its base and save a full checkpoint")
    m.add_argument("base")
    m.add_argument("adapter")
    m.add_argument("out")
    m.set_defaults(fn=cmd_merge)

    d = sub.add_parser("demo", help="fine-tune the shipped base on a synthetic task (CPU, minutes)")
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--method", default=None, help="override the demo's method (qlora, lora, full)")
    d.set_defaults(fn=cmd_demo)

    b = sub.add_parser("bench", help="run a benchmark script from experiments/")
    b.add_argument("what", choices=["kernels", "quant", "optim", "lora"])
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except PeftlabError as e:
        print(f"peftlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
