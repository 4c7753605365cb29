"""The `peftlab` command: every verb end to end on the shipped tiny base, and clean errors."""
import json

import pytest
import torch

from peftlab.cli import main
from peftlab.models import load_pretrained


def test_shipped_bases_load_and_know_their_shapes():
    for name, params in (("tiny", 1_328_256), ("small", 7_377_152), ("small-bias", 7_398_400)):
        model, tok = load_pretrained(f"peftlab/assets/base-{name}")
        assert sum(p.numel() for p in model.parameters()) == params
        assert tok.vocab_size == model.config.vocab_size == 2048
        assert model.config.num_key_value_heads == model.config.num_attention_heads


@pytest.mark.parametrize("base", ["tiny", "small", "small-bias"])
def test_eval_and_generate_work_on_every_shipped_base(base, capsys):
    assert main(["eval", "--model", base, "--task", "classify", "--limit", "2", "--device", "cpu"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["n"] == 2 and ev["loss"] > 0
    assert main(["generate", "--model", base, "--max-new-tokens", "4", "--device", "cpu", "Ru Dakthorn was"]) == 0
    assert capsys.readouterr().out.strip()  # the continuation


def test_demo_runs_and_prints_before_after(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy (exact)" in out and "before" in out and "after" in out
    assert f"run directory: {(tmp_path / 'demo').resolve()}" in out
    cfg = json.loads((tmp_path / "demo" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8


def _write_cfg(tmp_path, **extra):
    lines = ["model: tiny", "method: lora", "peft: {r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}",
             "data: {task: qa, max_length: 64, max_train_examples: 32, max_eval_examples: 4}",
             "max_steps: 3", "batch_size: 4", "lr: 1e-3", "progress: false", "eval_max_new_tokens: 4",
             f"output_dir: {tmp_path / 'run'}"] + [f"{k}: {v}" for k, v in extra.items()]
    p = tmp_path / "cfg.yaml"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_train_eval_generate_merge_end_to_end(tmp_path, capsys):
    cfg = _write_cfg(tmp_path)
    assert main(["train", str(cfg), "seed=1"]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert main(["eval", "--model", "tiny", "--adapter", str(adapter), "--task", "qa", "--limit", "4"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    ev = json.loads(line)
    assert ev["n"] == 4 and 0 <= ev["accuracy"] <= 1 and ev["loss"] > 0
    assert main(["generate", "--model", "tiny", "--adapter", str(adapter), "--max-new-tokens", "3", "Hello"]) == 0
    assert main(["merge", "peftlab/assets/base-tiny", str(adapter), str(tmp_path / "merged")]) == 0
    merged, _ = load_pretrained(tmp_path / "merged")
    from peftlab.tuners import merge_and_unload
    from peftlab.tuners.io import load_adapter

    # the merge happens in float32 and is stored in the base's dtype (bfloat16): same bits here
    ref = merge_and_unload(load_adapter(load_pretrained("peftlab/assets/base-tiny")[0], adapter))
    for (name, a), (_, b) in zip(sorted(merged.state_dict().items()), sorted(ref.state_dict().items())):
        assert torch.equal(a, b.to(torch.bfloat16).float()), name


def test_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    cfg = _write_cfg(tmp_path, learning_rate=0.1)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftlab: error: ") and "learning_rate" in err and "Traceback" not in err
    assert main(["eval", "--model", str(tmp_path / "missing")]) == 2
    assert "missing: not a checkpoint directory" in capsys.readouterr().err
    for argv, message in ((["eval", "--model", "tiny", "--task", "arith"], "unknown task 'arith'"),
                          (["eval", "--model", "tiny", "--split", "dev"], "unknown split 'dev'"),
                          (["generate", "--model", "tiny", "--device", "gpu0", "Hi"], "device 'gpu0'"),
                          (["generate", "--model", "tiny", "--max-new-tokens", "-1", "Hi"], "max_new_tokens")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("peftlab: error: ") and message in err and len(err.splitlines()) == 1, argv
