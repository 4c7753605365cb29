"""experiments/scaling.py end to end on the CPU (gloo): the plumbing that issue 9's GPU runs use."""
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("scaling", ROOT / "experiments" / "scaling.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["scaling"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_scaling_script_runs_one_and_two_processes_with_matching_losses(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    scaling = _load()
    rc = scaling.main(["--device", "cpu", "--shape", "tiny", "--gpus", "1", "2", "--modes", "lora_ddp",
                       "--steps", "4", "--log-every", "2", "--global-batch", "4", "--seq", "64",
                       "--out", str(tmp_path)])
    assert rc == 0
    table = (tmp_path / "scaling.md").read_text()
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| lora_ddp")]
    assert [r[1].strip() for r in rows] == ["1", "2"]
    assert float(rows[0][3]) > 0 and float(rows[1][3]) > 0            # tokens per second
    assert float(rows[1][6]) < 1e-5            # 2 processes follow 1 process at the same global batch
    assert (tmp_path / "scaling.csv").is_file() and (tmp_path / "logs" / "scaling_lora_ddp_2.log").is_file()
