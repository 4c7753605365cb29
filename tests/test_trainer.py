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


def test_accumulation_equals_large_batch(base_dir, tmp_path):
    big = train(_cfg(base_dir, tmp_path / "big", batch_size=8, max_steps=3))
    acc = train(_cfg(base_dir, tmp_path / "acc", batch_size=2, grad_accum=4, max_steps=3))
    for a, b in zip(big.losses, acc.losses):
        assert a == pytest.approx(b, rel=1e-5)


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(base_dir, tmp_path, monkeypatch):
    import peftlab.train.trainer as T

    real = T.token_loss_sum
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        s, n = real(logits, labels)
        return (s * float("nan"), n) if calls["n"] > 3 else (s, n)

    monkeypatch.setattr(T, "token_loss_sum", poisoned)
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
