"""Helpers shared by the experiment scripts: a resumable run cache and the machine description.

`RunCache` is an append-only JSONL file of finished runs, one object per line with a unique
"key"; a script looks a run up before doing it, so an interrupted script resumes where it
stopped (delete a line to redo that run). `environment()` is what every results table records.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Dict, Iterator

import torch


class RunCache:
    """{key: record} backed by an append-only JSONL file (later lines win)."""

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        self.records: Dict[str, dict] = {}
        if self.path.is_file():
            for i, line in enumerate(self.path.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise SystemExit(f"{self.path}: line {i + 1} is not JSON ({e}); delete it to redo that run")
                    self.records[rec["key"]] = rec

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __getitem__(self, key: str) -> dict:
        return self.records[key]

    def get(self, key: str, default=None):
        return self.records.get(key, default)

    def values(self) -> Iterator[dict]:
        return iter(list(self.records.values()))

    def add(self, rec: dict) -> dict:
        """Append `rec` (which must have a "key") and flush it to disk at once."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        self.records[rec["key"]] = rec
        return rec


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> Dict[str, str]:
    """Date, CPU (with core count), torch version and torch threads, for results tables."""
    return {"date": datetime.date.today().isoformat(), "cpu": f"{cpu_name()} ({os.cpu_count()} cores)",
            "torch": torch.__version__, "threads": str(torch.get_num_threads())}
