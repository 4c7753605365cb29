"""Distributed training (DDP, FSDP2) with 2 processes: parity with 1 process on the same global
batch, sharded checkpoints, resume after a kill, export, mixed precision, launch errors.

The 2-process runs are real `torchrun` launches (`python -m torch.distributed.run --standalone`)
on CPU with gloo; with 2+ GPUs the same scenarios also run on CUDA with nccl. To save process
start-up time, one launch runs all parity scenarios in turn (this file is also the worker script:
`python -m torch.distributed.run ... tests/test_distributed.py SPEC.json`).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from peftlab.errors import CheckpointError, ConfigError, PeftlabError

WORLD = 2
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and torch.cuda.device_count() >= WORLD else [])
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}

# name -> (config overrides, single-process reference, relative tolerance on the losses)
SCENARIOS = {
    "lora_ddp": (dict(method="lora", peft=LORA, distributed="ddp", batch_size=1, global_batch_size=4), "lora", 1e-5),
    "lora_ddp_ckpt": (dict(method="lora", peft=LORA, distributed="ddp", gradient_checkpointing=True), "lora", 1e-5),
    "lora_fsdp": (dict(method="lora", peft=LORA, distributed="fsdp", sharding="grad_op", save_every=2), "lora", 1e-5),
    "full_fsdp": (dict(method="full", distributed="fsdp", sharding="full", batch_size=1, grad_accum=2,
                       eval_generate=True, eval_max_new_tokens=2), "full", 1e-5),  # generation through FSDP
    "qlora_fsdp": (dict(method="qlora", quantize="nf4", peft=LORA, distributed="fsdp", sharding="full",
                        export_merged=True), "qlora", 1e-5),
    # bf16 compute with fp32 master weights (FSDP MixedPrecisionPolicy) and activation checkpointing
    "qlora_fsdp_bf16": (dict(method="qlora", quantize="nf4", peft=LORA, distributed="fsdp", sharding="grad_op",
                             autocast="bfloat16", gradient_checkpointing=True), "qlora", 3e-3),
}
REFERENCES = {"lora": dict(method="lora", peft=LORA), "full": dict(method="full"),
              "qlora": dict(method="qlora", quantize="nf4", peft=LORA)}


def _config(base_dir, out, device, **kw):
    c = dict(model=str(base_dir), data=dict(task="qa", max_length=64, max_train_examples=64, max_eval_examples=8),
             max_steps=6, batch_size=2, lr=1e-2, output_dir=str(out), progress=False, log_every=1,
             eval_generate=False, seed=3, device=device, autocast="none")
    c.update(kw)
    return c


def _write_config(path, d):
    path.write_text(yaml.safe_dump(d))
    return path


def _launch(args, timeout=300):
    """torchrun with WORLD processes; returns the CompletedProcess (stdout and stderr together)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")  # as conftest.py does for this process
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *args]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env)


def _adapter(run_dir):
    from peftlab.fileio import load_safetensors

    d = Path(run_dir)
    f = d / "adapter" / "adapter_model.safetensors"
    return load_safetensors(f if f.is_file() else d / "model" / "model.safetensors")


@pytest.fixture(scope="module", params=DEVICES)
def runs(request, base_dir, tmp_path_factory):
    """All parity scenarios in one 2-process launch, plus their 1-process references."""
    from peftlab.train import load_train_config, train
    from peftlab.train.export import export_final

    device = request.param
    root = tmp_path_factory.mktemp(f"dist-{device}")
    refs = {}
    for name, kw in REFERENCES.items():
        cfg = load_train_config(base=_config(base_dir, root / f"ref-{name}", device, batch_size=4, **kw))
        with pytest.MonkeyPatch.context() as mp:
            # FSDP takes the logits loss path (linear_ce.output_head); the references of FSDP-only scenarios
            # ("full", "qlora") take it too, so that both sides sum the same float32 terms; the "lora" reference
            # (shared with DDP, whose frozen head is fused) keeps the fused path
            if name in ("full", "qlora"):
                mp.setattr("peftlab.train.linear_ce.output_head", lambda model: None)
            res = train(cfg, log=lambda *a: None)
        export_final(res, cfg)
        refs[name] = {"losses": res.losses, "eval_loss": res.eval["loss"]}
    spec = {"out": str(root / "results.json"), "scenarios": {}}
    for name, (kw, _, _) in SCENARIOS.items():
        spec["scenarios"][name] = str(_write_config(root / f"{name}.yaml", _config(base_dir, root / name, device, **kw)))
    spec["scenarios"]["resume_fsdp_under_ddp"] = str(_write_config(root / "cross.yaml", _config(
        base_dir, root / "lora_fsdp_copy", device, **{**SCENARIOS["lora_fsdp"][0], "distributed": "ddp"})))
    spec["scenarios"]["resume_single_process_checkpoint"] = str(_write_config(root / "single.yaml", _config(
        base_dir, root / "single", device, method="lora", peft=LORA, distributed="ddp", save_every=2)))
    spec["scenarios"]["time_limit"] = str(_write_config(root / "time.yaml", _config(
        base_dir, root / "time_limit", device, method="lora", peft=LORA, distributed="ddp", save_every=5,
        max_minutes=0.0)))
    train(load_train_config(base=_config(base_dir, root / "single", device, method="lora", peft=LORA, save_every=2,
                                         max_steps=3)), log=lambda *a: None)
    (root / "spec.json").write_text(json.dumps(spec))
    proc = _launch([__file__, str(root / "spec.json")])
    assert proc.returncode == 0, proc.stdout[-6000:]
    return {"root": root, "refs": refs, "dist": json.loads((root / "results.json").read_text()),
            "device": device, "base_dir": base_dir}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_match_one_rank_on_the_same_global_batch(runs, name):
    _, ref, rtol = SCENARIOS[name]
    bf16 = rtol > 1e-5
    if runs["device"] == "cuda" and ref == "qlora":
        rtol = max(rtol, 3e-3)  # on CUDA, <= 128 rows take the fused 4-bit kernel, TF32 for float32 input
    got, want = runs["dist"][name]["losses"], runs["refs"][ref]["losses"]
    assert len(got) == len(want) == 6
    assert got == pytest.approx(want, rel=rtol, abs=0)
    assert runs["dist"][name]["summary"]["eval"]["loss"] == pytest.approx(runs["refs"][ref]["eval_loss"],
                                                                         rel=max(rtol, 1e-5) * 10)
    a, b = _adapter(runs["root"] / name), _adapter(runs["root"] / f"ref-{ref}")
    assert sorted(a) == sorted(b) and len(a) > 0
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32, k  # fp32 master weights, also under bf16 compute
        if rtol <= 1e-5:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
        else:  # Adam turns tiny bf16 gradient differences into whole steps: within 3 steps of lr 1e-2
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=3e-2, msg=f"{name}: {k}")
    if bf16:  # bf16 compute really happened: close to, but not exactly, the fp32 trajectory
        assert got != want


def test_fsdp_shards_parameters_optimizer_state_and_4bit_weights(runs):
    d = runs["dist"]
    # each rank holds half of every sharded tensor: packed 4-bit bytes, LoRA weights, full weights
    assert d["qlora_fsdp"]["packed_4bit_local_fraction"] == pytest.approx(1 / WORLD, abs=0.02)
    assert d["qlora_fsdp"]["packed_4bit_storage"] == "torch.float32"
    assert d["qlora_fsdp_bf16"]["packed_4bit_storage"] == "torch.bfloat16"  # FSDP's param dtype: never cast
    assert d["full_fsdp"]["trainable_local_fraction"] == pytest.approx(1 / WORLD, abs=0.02)
    assert d["lora_ddp"]["trainable_local_fraction"] == 1.0
    # the sharded checkpoint: JSON index + one safetensors file per rank, each chunk written once
    ck = runs["root"] / "lora_fsdp" / "checkpoints"
    assert (ck / "LATEST").read_text() == "step-000004"
    index = json.loads((ck / "step-000004" / "dcp" / "index.json").read_text())
    entry = index["tensors"]["model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert entry["shape"] == [4, 32] and [c["offsets"] for c in entry["chunks"]] == [[0, 0], [2, 0]]
    moments = index["tensors"]["optim.state.model.layers.0.self_attn.q_proj.lora_A.default.weight.exp_avg"]
    assert {c["file"] for c in moments["chunks"]} == {"rank-00000.safetensors", "rank-00001.safetensors"}
    assert sorted(p.name for p in (ck / "step-000004" / "dcp").iterdir()) == [
        "index.json", "rank-00000.safetensors", "rank-00001.safetensors"]
    state = json.loads((ck / "step-000004" / "state.json").read_text())
    assert state["format"] == "dcp" and state["world_size"] == WORLD and state["distributed"] == "fsdp"


def test_rank0_exports_generation_metrics_and_the_merged_model(runs, tmp_path):
    from peftlab.fileio import load_safetensors
    from peftlab.tuners.merge import merge_to_checkpoint

    ev = runs["dist"]["full_fsdp"]["summary"]["eval"]
    assert ev["n"] == 8 and 0.0 <= ev["accuracy"] <= 1.0  # greedy decoding through the sharded model
    # the merged export is the exported QLoRA adapter folded into the full-precision base
    merged = load_safetensors(runs["root"] / "qlora_fsdp" / "merged" / "model.safetensors")
    ref = merge_to_checkpoint(runs["base_dir"], runs["root"] / "qlora_fsdp" / "adapter", tmp_path / "m")
    want = load_safetensors(ref / "model.safetensors")
    base = load_safetensors(runs["base_dir"] / "model.safetensors")
    assert sorted(merged) == sorted(want) and all(torch.equal(merged[k], want[k]) for k in want)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q]) and torch.equal(merged["model.norm.weight"], base["model.norm.weight"])


def test_sharded_checkpoint_resumes_under_another_wrapper(runs):
    fsdp, cross = runs["dist"]["lora_fsdp"]["losses"], runs["dist"]["resume_fsdp_under_ddp"]
    assert cross["resumed_at"] == 4 and len(cross["losses"]) == 2
    assert cross["losses"] == pytest.approx(fsdp[4:], rel=1e-5, abs=0)


def test_wrong_checkpoint_formats_are_named(runs, monkeypatch):
    from peftlab.train import load_train_config, train

    err = runs["dist"]["resume_single_process_checkpoint"]["error"]
    assert "CheckpointError" in err and "single-process run" in err and "step-000002" in err
    cfg = load_train_config(base=_config(runs["base_dir"], runs["root"] / "lora_fsdp", runs["device"],
                                         **{**SCENARIOS["lora_fsdp"][0], "distributed": "none"}))
    with pytest.raises(CheckpointError, match=r"step-000004: written by a 2-process fsdp run .*torchrun"):
        train(cfg, log=lambda *a: None)


def test_killed_run_resumes_with_the_same_losses(runs):
    """A torchrun job SIGKILLed during step 5 (after the step-4 checkpoint) and launched again with
    the same command continues with exactly the uninterrupted run's losses."""
    root = runs["root"]
    cfg = yaml.safe_load((root / "lora_fsdp.yaml").read_text())
    cfg["output_dir"] = str(root / "killed")
    path = _write_config(root / "killed.yaml", cfg)
    first = _launch([__file__, "--kill-at-step", "5", "train", str(path)])
    assert first.returncode != 0 and "[peftlab] run directory" not in first.stdout, first.stdout[-4000:]
    ck = root / "killed" / "checkpoints"
    assert (ck / "LATEST").read_text() == "step-000004" and not list(ck.glob(".*"))
    second = _launch(["-m", "peftlab", "train", str(path)])
    assert second.returncode == 0, second.stdout[-4000:]
    assert "resumed from" in second.stdout and "at step 4" in second.stdout
    rows = [json.loads(x) for x in (root / "killed" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    uninterrupted = runs["dist"]["lora_fsdp"]["losses"]
    got = [losses[s] for s in range(1, 7)]
    assert got == uninterrupted, (got, uninterrupted)  # bit-identical, before and after the kill
    tokens = [(r["step"], r["tokens"]) for r in rows if "loss" in r]  # each step once, counted over ranks
    ref_rows = [json.loads(x) for x in (root / "lora_fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert tokens == [(r["step"], r["tokens"]) for r in ref_rows if "loss" in r]
    a, b = _adapter(root / "killed"), _adapter(root / "lora_fsdp")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_time_limit_stops_every_rank_after_the_same_step(runs):
    out = runs["dist"]["time_limit"]
    assert len(out["losses"]) == 1 and out["summary"]["steps"] == 1
    assert (runs["root"] / "time_limit" / "checkpoints" / "LATEST").read_text() == "step-000001"


# --- launch checks (no processes needed) ----------------------------------------------------------
def _plan(d, world=2, rank=0, local_rank=0, cuda_count=0, backend=None):
    from peftlab.train import load_train_config
    from peftlab.train.distributed import LaunchEnv, plan_launch

    cfg = load_train_config(base=dict(model="tiny", data=dict(task="qa"), **d))
    return plan_launch(cfg, LaunchEnv(rank, world, local_rank), cuda_count=cuda_count, backend_override=backend)


def test_launch_misconfigurations_are_clear_errors():
    with pytest.raises(ConfigError, match=r"'fsdp' on a single process .*torchrun --nproc_per_node"):
        _plan(dict(distributed="fsdp"), world=1)
    with pytest.raises(ConfigError, match=r"'ddp' on a single process"):
        _plan(dict(distributed="ddp"), world=1)
    with pytest.raises(ConfigError, match=r"'distributed' is 'none' but the launcher started 4 processes"):
        _plan(dict(distributed="none"), world=4)
    with pytest.raises(ConfigError, match=r"nccl backend needs CUDA GPUs and none is visible"):
        _plan(dict(distributed="ddp"), backend="nccl")
    with pytest.raises(ConfigError, match=r"'device': 'cuda' but CUDA is not available"):
        _plan(dict(distributed="ddp", device="cuda"))
    with pytest.raises(ConfigError, match=r"PEFTLAB_DIST_BACKEND='mpi' is not one of nccl, gloo"):
        _plan(dict(distributed="ddp"), backend="mpi")
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=1 but only 1 GPU\(s\) are visible"):
        _plan(dict(distributed="fsdp"), rank=1, local_rank=1, cuda_count=1)
    with pytest.raises(ConfigError, match=r"'global_batch_size' \(12\) is not divisible by batch_size x world size "
                                          r"= 2 x 4 = 8"):
        _plan(dict(distributed="ddp", batch_size=2, global_batch_size=12), world=4)
    with pytest.raises(ConfigError, match=r"'grad_accum' \(3\) disagrees with global_batch_size 16"):
        _plan(dict(distributed="ddp", batch_size=2, grad_accum=3, global_batch_size=16), world=4)
    with pytest.raises(ConfigError, match=r"'paged_adamw' is single-process only"):
        _plan(dict(distributed="fsdp", optimizer="paged_adamw"))
    with pytest.raises(ConfigError, match=r"DoRA on a 4-bit base \(QDoRA\) is not supported under fsdp"):
        _plan(dict(distributed="fsdp", method="dora", quantize="nf4"))
    with pytest.raises(ConfigError, match=r"'export_merged' needs an adapter method .* got method 'full'"):
        _plan(dict(distributed="fsdp", method="full", export_merged=True))


def test_launch_plan_picks_backend_and_device():
    assert _plan(dict(distributed="fsdp"))["backend"] == "gloo"
    p = _plan(dict(distributed="fsdp"), rank=3, local_rank=1, world=4, cuda_count=2)
    assert p["backend"] == "nccl" and p["device"] == torch.device("cuda", 1)  # GPU from LOCAL_RANK, not RANK
    p = _plan(dict(distributed="ddp"), cuda_count=2, backend="gloo")  # override on a GPU host: CPU + gloo
    assert p["backend"] == "gloo" and p["device"] == torch.device("cpu")
    with pytest.raises(ConfigError, match="gloo has no reduce-scatter on GPUs"):
        _plan(dict(distributed="fsdp", device="cuda"), cuda_count=2, backend="gloo")


def test_global_batch_size_sets_accumulation():
    from peftlab.train import load_train_config

    cfg = load_train_config(base=dict(model="tiny", data=dict(task="qa"), batch_size=2, global_batch_size=16))
    assert cfg.for_world(4).grad_accum == 2 and cfg.for_world(1).grad_accum == 8 and cfg.grad_accum == 1
    with pytest.raises(ConfigError, match="global_batch_size' must be >= 1"):
        load_train_config(base=dict(model="tiny", data=dict(task="qa"), global_batch_size=0))


def test_fsdp_on_one_process_fails_from_the_cli(tmp_path, monkeypatch, capsys):
    from peftlab.cli import main

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    p = _write_config(tmp_path / "c.yaml", dict(model="tiny", data=dict(task="qa"), distributed="fsdp"))
    assert main(["train", str(p)]) == 2
    assert "distributed': 'fsdp' on a single process" in capsys.readouterr().err


# --- pieces on one process ------------------------------------------------------------------------
def test_quant_storage_keeps_the_bytes_and_the_bitsandbytes_state_dict():
    from peftlab.quant import Linear4bit

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    m = Linear4bit.from_linear(lin, "nf4", 64, True)
    x = torch.randn(3, 64)
    y, packed = m(x), m.weight.clone()
    m.set_quant_storage(torch.bfloat16)
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias"]  # FSDP shards parameters only
    assert m.weight.dtype == torch.bfloat16 and m.weight.shape == (packed.numel() // 2, 1)
    assert not m.weight.requires_grad and torch.equal(m.packed_weight(), packed) and torch.equal(m(x), y)
    m.to(torch.float16)  # a dtype cast moves the bias, never the bytes
    assert m.weight.dtype == torch.bfloat16 and torch.equal(m.packed_weight(), packed)
    sd = m.state_dict()
    assert sd["weight"].dtype == torch.bfloat16 and "weight.quant_state.bitsandbytes__nf4" in sd
    plain = Linear4bit(64, 32)
    plain.load_state_dict(sd)  # bitsandbytes' quant_storage layout reads back as uint8
    assert plain.weight.dtype == torch.uint8 and torch.equal(plain.weight, packed)
    with pytest.raises(PeftlabError, match=r"cannot store 6 packed bytes as torch.float32"):
        Linear4bit(6, 2).set_quant_storage(torch.float32)


def test_quant_storage_state_dict_decodes_in_bitsandbytes():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    from peftlab.quant import Linear4bit

    torch.manual_seed(0)
    m = Linear4bit.from_linear(torch.nn.Linear(64, 32), "nf4", 64, True).set_quant_storage(torch.bfloat16)
    sd = m.state_dict()
    qs = bnb_f.QuantState.from_dict({k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")},
                                    device=torch.device("cpu"))
    assert torch.equal(bnb_f.dequantize_4bit(sd["weight"], qs), m.dequantize())


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP's note on a single process
def test_sharded_storage_round_trip_without_pickle(tmp_path):
    from peftlab.train.dist_checkpoint import load_sharded, save_sharded

    state = {"model": {"a.weight": torch.randn(5, 3), "b": torch.arange(4.0)},
             "optim": {"state": {"a.weight": {"step": torch.tensor(7.0), "exp_avg": torch.randn(5, 3)}}}}
    save_sharded(tmp_path / "ck", state)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert files == ["index.json", "rank-00000.safetensors"]
    assert not any(b"pickle" in (tmp_path / "ck" / f).read_bytes()[:200] for f in files)
    target = {"model": {"a.weight": torch.zeros(5, 3), "b": torch.zeros(4)},
              "optim": {"state": {"a.weight": {"step": torch.tensor(0.0), "exp_avg": torch.zeros(5, 3)}}}}
    load_sharded(tmp_path / "ck", target)
    assert torch.equal(target["model"]["a.weight"], state["model"]["a.weight"])
    assert float(target["optim"]["state"]["a.weight"]["step"]) == 7.0
    with pytest.raises(CheckpointError, match=r"index.json: does not match .*missing \['model.c'\]"):
        load_sharded(tmp_path / "ck", {"model": {**target["model"], "c": torch.zeros(1)}, "optim": target["optim"]})
    with pytest.raises(CheckpointError, match=r"tensor 'model.b' has shape \(4,\), this run has \(5,\)"):
        load_sharded(tmp_path / "ck", {"model": {"a.weight": torch.zeros(5, 3), "b": torch.zeros(5)},
                                       "optim": target["optim"]})
    f = tmp_path / "ck" / "rank-00000.safetensors"
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=r"rank-00000.safetensors: truncated"):
        load_sharded(tmp_path / "ck", target)


# --- the worker (run by torchrun) -------------------------------------------------------------------
def _local_fraction(tensors):
    local = sum(t.to_local().numel() if hasattr(t, "to_local") else t.numel() for t in tensors)
    return local / max(1, sum(t.numel() for t in tensors))


def _run_scenarios(spec_path):
    import shutil

    from peftlab.quant.linear4bit import Linear4bit
    from peftlab.train import load_train_config, train
    from peftlab.train.distributed import DistributedRun, LaunchEnv

    spec = json.loads(Path(spec_path).read_text())
    results, run = {}, None
    for name, path in spec["scenarios"].items():
        cfg = load_train_config(path)
        if name == "resume_fsdp_under_ddp" and LaunchEnv.from_environ().rank == 0:
            shutil.copytree(Path(cfg.output_dir).parent / "lora_fsdp", cfg.output_dir)
        run = DistributedRun.start(cfg)  # the process group of the first scenario is reused
        run.barrier()
        out = {}
        try:
            res = train(cfg, log=lambda *a: None, dist=run)
        except PeftlabError as e:
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        run.reshard(res.model)  # after the final evaluation (no backward), as a checkpoint would
        layers = [m for m in res.model.modules() if isinstance(m, Linear4bit)]
        if layers:
            out["packed_4bit_local_fraction"] = _local_fraction([m.weight for m in layers])
            out["packed_4bit_storage"] = str(layers[0].weight.dtype)
        out["trainable_local_fraction"] = _local_fraction([p for p in res.model.parameters() if p.requires_grad])
        run.export(res, cfg)
        summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text()) if run.rank == 0 else {}
        out.update(losses=res.losses, resumed_at=cfg.max_steps - len(res.losses), summary=summary)
        results[name] = out
    if run.rank == 0:
        Path(spec["out"]).write_text(json.dumps(results))
    run.close()


def _kill_at_step(n, argv):
    """Run the CLI with every rank SIGKILLing itself inside its n-th optimizer step (1-based)."""
    import signal

    from peftlab.cli import main

    orig, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, *a, **k)

    torch.optim.AdamW.step = step
    return main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "--kill-at-step":
        sys.exit(_kill_at_step(int(sys.argv[2]), sys.argv[3:]))
    _run_scenarios(sys.argv[1])
