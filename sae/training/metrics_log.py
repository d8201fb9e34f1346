"""Training metrics as TensorBoard event files and a JSON-lines log, under any storage URI.

Events are written to a local directory (TensorBoard's writers cannot reach every store) and
copied to the output URI at each flush, so a remote run's curves appear while it trains.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tensorboardX import SummaryWriter

from sae.io import storage


class MetricsLog:
    def __init__(self, output_uri: str) -> None:
        self.output_uri = output_uri
        self._remote = storage.is_gcs(output_uri)
        self._local = (
            Path(tempfile.mkdtemp(prefix="sae-metrics-")) if self._remote else Path(output_uri)
        )
        self._local.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(str(self._local / "tensorboard"))
        self._jsonl = (self._local / "metrics.jsonl").open("a")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self._writer.add_scalar(f"train/{name}", value, step)
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")

    def flush(self) -> None:
        self._writer.flush()
        self._jsonl.flush()
        if self._remote:
            storage.upload_tree(str(self._local), self.output_uri)

    def close(self) -> None:
        self.flush()
        self._writer.close()
        self._jsonl.close()
