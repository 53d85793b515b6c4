"""An accelerate tracker that appends one JSON object per ``log`` call to a file: always on,
no dependency, easy to read back (``[json.loads(l) for l in open(path)]``)."""
from __future__ import annotations

import json
import os
import time

from accelerate.tracking import GeneralTracker, on_main_process


class JSONLTracker(GeneralTracker):
    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str):
        super().__init__()
        self.path = os.path.join(logging_dir, f"{run_name}.jsonl")

    @property
    def tracker(self):
        return self.path

    def _write(self, record: dict) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    @on_main_process
    def store_init_configuration(self, values: dict):
        self._write({"config": values, "time": time.time()})

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        self._write({"step": step, **values, "time": time.time()})
