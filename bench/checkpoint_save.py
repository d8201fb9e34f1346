"""How long the SIGTERM checkpoint takes at production shapes: the train state of the SAEs
(parameters, Adam moments, tracking) saved through the trainer's Checkpointer (Orbax) and
waited for, plus one host's stream position, printed as JSON. A spot VM has ~30 s from the
preemption notice; the TPU startup script gives the container 25 (its docker stop timeout).

    python bench/checkpoint_save.py                       # one 16k TopK SAE at d 2304, local
    python bench/checkpoint_save.py --saes 2 --out gs://bucket/tmp/ckpt
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import date

import jax
import numpy as np

from sae import arch, sharding
from sae.arch import SaeSpec
from sae.config import TrainConfig
from sae.data.activations import StreamPosition
from sae.io import storage
from sae.training.checkpoint import Checkpointer
from sae.training.step import Member, StepTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=2304)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--saes", type=int, default=1, help="TopK SAEs in the run")
    parser.add_argument("--buffer-rows", type=int, default=16384, help="train.shuffle_buffer")
    parser.add_argument("--out", default="", help="where to save (default: a local temp dir)")
    args = parser.parse_args()
    d, m = args.d_model, args.d_sae
    train = TrainConfig(steps=10, lr_warmup_steps=0, lr_decay_fraction=0.0)
    members = {
        f"topk-{i}": Member(arch.build(SaeSpec(architecture="topk", k=64), d, d_sae=m), train)
        for i in range(args.saes)
    }
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    trainer = StepTrainer(members, mesh)
    sample = np.random.default_rng(0).normal(size=(256, d)).astype(np.float32)
    states = jax.block_until_ready(trainer.init_state(0, sample))
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(states))
    rows = np.random.default_rng(1).normal(size=(args.buffer_rows, d)).astype(np.float32)
    position = StreamPosition(rows, np.random.default_rng(2).bit_generator.state, rows[:0], 0)
    with tempfile.TemporaryDirectory() as local:
        out = args.out or local
        checkpoints = Checkpointer(storage.join(out, "checkpoints"))
        start = time.perf_counter()
        data = position.to_bytes()
        storage.write_bytes(storage.join(out, "stream-positions", "1", "host-00000.npz"), data)
        position_seconds = time.perf_counter() - start
        checkpoints.save(1, states, {"step": 1})
        checkpoints.close()  # what the SIGTERM path does: wait until the save has landed
        seconds = time.perf_counter() - start
    device = jax.devices()[0]
    print(
        json.dumps(
            {
                "benchmark": "checkpoint_save",
                "date": date.today().isoformat(),
                "device": f"{device.platform}:{device.device_kind}",
                "host": platform.node(),
                "destination": args.out or "local temp dir",
                "shapes": {"d_model": d, "d_sae": m, "saes": args.saes},
                "state_bytes": state_bytes,
                "stream_position_bytes": len(data),
                "stream_position_seconds": position_seconds,
                "seconds_to_saved": seconds,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
