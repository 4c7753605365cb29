"""Trainer: strict configs, exact resume, accumulation equivalence, non-finite loss handling."""
import json
import math

import pytest
import torch

from peftlab.errors import ConfigError, TrainingError
from peftlab.train import load_train_config, train
from peftlab.train.batches import StepSampler
from peftlab.train.trainer import lr_factor


def _cfg(base_dir, out, **kw):
    base = dict(model=str(base_dir), method="full", data=dict(task="qa", max_length=64, max_train_examples=64,
                                                               max_eval_examples=8),
                max_steps=6, batch_size=4, lr=1e-2, output_dir=str(out), progress=False, log_every=1,
                eval_generate=False, seed=3)
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return load_train_config(base=base)


def test_unknown_key_lists_valid_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: tiny\ndata: {task: qa}\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key\(s\) 'learning_rate'.*valid keys: .*\blr\b"):
        load_train_config(str(p))
    p.write_text("model: tiny\ndata: {task: qa, max_len: 5}\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'max_len' \(did you mean 'max_length'\?\) for DataConfig"):
        load_train_config(str(p))


def test_bad_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match="field 'method'"):
        load_train_config(base=dict(model="tiny", data=dict(task="qa"), method="adapterdrop"))
    with pytest.raises(ConfigError, match="field 'lr': expected a number"):
        load_train_config(base=dict(model="tiny", data=dict(task="qa")), overrides=["lr=fast"])
    cfg = load_train_config(base=dict(model="tiny", data=dict(task="qa")), overrides=["lr=2e-3", "data.max_length=17"])
    assert cfg.lr == 2e-3 and cfg.data.max_length == 17


def test_schedule_shapes():
    cfg = load_train_config(base=dict(model="tiny", data=dict(task="qa"), max_steps=110, warmup_steps=10,
                                      schedule="cosine", min_lr_ratio=0.1))
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def test_sampler_ranks_partition_the_global_batch():
    one = StepSampler(37, batch_size=6, grad_accum=2, seed=1)
    two = [StepSampler(37, batch_size=3, grad_accum=2, seed=1, rank=r, world_size=2) for r in range(2)]
    for step in range(9):  # crosses several epochs
        for k in range(2):
            assert one.micro_batches(step)[k] == two[0].micro_batches(step)[k] + two[1].micro_batches(step)[k]
    # each example exactly once per epoch
    seen = [i for s in range(4) for mb in one.micro_batches(s) for i in mb][:37]
    assert sorted(seen) == list(range(37))


def test_resume_reproduces_uninterrupted_losses(base_dir, tmp_path, monkeypatch):
    full = train(_cfg(base_dir, tmp_path / "a", save_every=3))
    calls = {"n": 0}
    orig = torch.optim.AdamW.step

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(base_dir, tmp_path / "b", save_every=3))
    monkeypatch.setattr(torch.optim.AdamW, "step", orig)
    resumed = train(_cfg(base_dir, tmp_path / "b", save_every=3))
    assert len(resumed.losses) == 3
    assert resumed.losses == full.losses[3:]  # bit-identical
    assert (tmp_path / "b" / "checkpoints" / "LATEST").read_text() == "step-000003"
    # the killed run had logged step 4 after the checkpoint: the resumed log has each step once,
    # with the token count carried over from the checkpoint
    rows = {}
    for run in ("a", "b"):
        lines = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        rows[run] = [(r["step"], r["tokens"], r["loss"]) for r in lines if "loss" in r]
    assert [r[0] for r in rows["b"]] == [1, 2, 3, 4, 5, 6]
    assert [r[:2] for r in rows["b"]] == [r[:2] for r in rows["a"]]


def test_accumulation_equals_large_batch(base_dir, tmp_path):
    big = train(_cfg(base_dir, tmp_path / "big", batch_size=8, max_steps=3))
    acc = train(_cfg(base_dir, tmp_path / "acc", batch_size=2, grad_accum=4, max_steps=3))
    for a, b in zip(big.losses, acc.losses):
        assert a == pytest.approx(b, rel=1e-5)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(base_dir, tmp_path, monkeypatch):
    import peftlab.train.trainer as T

    real = T.causal_lm_loss_sum  # the trainer's loss for every micro-batch
    calls = {"n": 0}

    def poisoned(model, ids, labels):
        calls["n"] += 1
        s, n = real(model, ids, labels)
        return (s * float("nan"), n) if calls["n"] > 3 else (s, n)

    monkeypatch.setattr(T, "causal_lm_loss_sum", poisoned)
    with pytest.raises(TrainingError, match=r"step 3: loss is nan.*Last good checkpoint: .*step-000002"):
        train(_cfg(base_dir, tmp_path / "nan", save_every=2))
    ck = tmp_path / "nan" / "checkpoints"
    assert (ck / "LATEST").read_text() == "step-000002"
    assert not any(p.name.startswith(".") for p in ck.iterdir())


def test_metrics_and_export(base_dir, tmp_path):
    from peftlab.train.export import export_final

    cfg = _cfg(base_dir, tmp_path / "m", max_steps=4, eval_generate=True, eval_max_new_tokens=3)
    res = train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 for r in lines if "loss" in r)
    final = [r for r in lines if "eval_loss" in r][-1]
    assert final["eval_n"] == 8 and 0.0 <= final["eval_accuracy"] <= 1.0
    out = export_final(res, cfg)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.model").is_file()


def test_time_limit_stops_reports_the_real_step_and_leaves_a_resumable_checkpoint(base_dir, tmp_path):
    out = tmp_path / "t"
    res = train(_cfg(base_dir, out, max_minutes=0.0, save_every=5))
    assert res.steps == 1 and len(res.losses) == 1
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 1, "stopped_early": True, "reason": "max_minutes"} in lines
    assert [r["step"] for r in lines if "eval_loss" in r] == [1]
    assert (out / "checkpoints" / "LATEST").read_text() == "step-000001"
    rest = train(_cfg(base_dir, out, save_every=5))
    assert rest.steps == 6 and len(rest.losses) == 5


def test_config_values_that_would_be_ignored_or_crash_later_are_errors(base_dir, tmp_path):
    base = dict(model="tiny", data=dict(task="qa"))
    with pytest.raises(ConfigError, match=r"field 'data\.task': 'arith' is not one of .*skills"):
        load_train_config(base={**base, "data": {"task": "arith"}})
    with pytest.raises(ConfigError, match=r"field 'data\.eval_split': 'dev'"):
        load_train_config(base={**base, "data": {"task": "qa", "eval_split": "dev"}})
    with pytest.raises(ConfigError, match="field 'save_dtype': 'bf16'"):
        load_train_config(base={**base, "save_dtype": "bf16"})
    with pytest.raises(ConfigError, match="field 'save_dtype': 'bfloat16' needs method 'full'"):
        load_train_config(base={**base, "method": "lora", "save_dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="device 'gpu0' is not a device name"):
        train(_cfg(base_dir, tmp_path / "d", device="gpu0"))
    with pytest.raises(ConfigError, match=r"'max_gpu_memory_fraction' must be in \(0, 1\], got 1\.5"):
        load_train_config(base={**base, "max_gpu_memory_fraction": 1.5})
    with pytest.raises(ConfigError, match="max_gpu_memory_fraction needs a CUDA device, got 'cpu'"):
        train(_cfg(base_dir, tmp_path / "m", device="cpu", max_gpu_memory_fraction=0.5))
    with pytest.raises(ConfigError, match=r"no training example keeps a trained token within data\.max_length=4"), \
            pytest.warns(UserWarning, match="64 of 64 examples have no trained token"):
        train(_cfg(base_dir, tmp_path / "short", data=dict(max_length=4)))


def test_tokenizer_larger_than_the_embedding_is_an_error(tmp_path):
    from peftlab.models import LlamaConfig, LlamaForCausalLM, save_pretrained

    small = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4)
    save_pretrained(LlamaForCausalLM(small).reset_parameters(seed=0), tmp_path / "base")
    cfg = _cfg(tmp_path / "base", tmp_path / "run", tokenizer="peftlab/assets/tokenizer/tokenizer.model")
    with pytest.raises(ConfigError, match=r"tokenizer .*tokenizer\.model has 2048 tokens but the model's embedding has 512"):
        train(cfg)


def test_train_files_alpaca_json_and_sharegpt_jsonl_with_skipped_records(base_dir, tmp_path):
    alpaca = [{"instruction": f"Say {w}", "input": "", "output": w} for w in ("hi", "yes", "no", "ok")]
    (tmp_path / "a.json").write_text(json.dumps(alpaca + [{"instruction": "Say", "output": ""}]))
    conv = {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi there"}]}
    (tmp_path / "s.jsonl").write_text("\n".join([json.dumps(conv)] * 4 + ["{not json"]) + "\n")
    for name in ("a.json", "s.jsonl"):
        logged = []
        cfg = _cfg(base_dir, tmp_path / f"run-{name}", max_steps=2, eval_generate=True, eval_max_new_tokens=2,
                   data=dict(task=None, train_file=str(tmp_path / name), eval_file=str(tmp_path / name),
                             skip_invalid=True))
        with pytest.warns(UserWarning, match="1 invalid skipped"):
            res = train(cfg, log=logged.append)
        assert len(res.losses) == 2 and res.eval["n"] == 4 and math.isfinite(res.eval["loss"])
        assert sum("4 of 5 records loaded" in line for line in logged) == 2  # train and eval file
        summary = json.loads((tmp_path / f"run-{name}" / "summary.json").read_text())
        assert len(summary["skipped_records"]) == 2 and "record 4" in summary["skipped_records"][0]


def test_eval_loss_with_nothing_to_score_is_nan_not_zero(base_dir):
    from peftlab.data.synthworld import load_task
    from peftlab.models import load_pretrained
    from peftlab.train.evaluate import evaluate_loss

    model, tok = load_pretrained(base_dir)
    examples = load_task("qa", "validation")[:3]
    assert evaluate_loss(model, tok, examples, max_length=64)["loss"] > 0
    ev = evaluate_loss(model, tok, examples, max_length=4)  # every answer truncated away
    assert ev["tokens"] == 0 and math.isnan(ev["loss"]) and math.isnan(ev["ppl"])
