"""Extraction throughput: the extract job's path and streaming extract+train, against the bare
jitted forward in the same run, printed as JSON.

    python bench/extract.py                                   # small shapes: runs anywhere
    python bench/extract.py --shapes gemma2-2b --dtype bfloat16   # one accelerator
    # the real shapes on a CPU: three 4096-token model batches per phase, two SAE steps
    python bench/extract.py --shapes gemma2-2b --dtype bfloat16 --batches 3 --batch 4 \
        --buffer 4096

The model is a keras-hub GemmaBackbone with random weights (Gemma 2 2B's shape for
`gemma2-2b`: sliding-window and soft-cap settings included), tapped at one layer, so the model
is truncated after that block. Three measurements, in tokens (sequence positions) per second:
- `forward`: the tap's jitted forward on device-resident batches, nothing else (reference);
- `extract`: what the extract job does: host batches in, activations out to the host, BOS and
  padding dropped, rows written to an activation store (bf16 zarr via tensorstore);
- `extract_train`: streaming as the train job does it (forwards in flight, the shuffle buffer
  in the model's dtype) into a TopK SAE step; `data_wait_fraction` is the share of its time
  the loop spent getting the next batch.
Resident host memory is sampled at the start and end of each phase: it should stay flat; each
phase's peak (Linux's high-water mark, reset at its start) and the whole run's are reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from sae import (
    arch,
    sharding,  # noqa: E402
)
from sae.arch import SaeSpec
from sae.config import TrainConfig  # noqa: E402
from sae.data import activation_store, activations
from sae.io.peak_memory import StageMemory
from sae.model import lm
from sae.training.step import Member, StepTrainer  # noqa: E402

GEMMA2_2B = {
    "vocabulary_size": 256000,
    "num_layers": 26,
    "num_query_heads": 8,
    "num_key_value_heads": 4,
    "hidden_dim": 2304,
    "intermediate_dim": 18432,
    "head_dim": 256,
    "query_head_dim_normalize": True,
    "use_post_ffw_norm": True,
    "use_post_attention_norm": True,
    "attention_logit_soft_cap": 50.0,
    "final_logit_soft_cap": 30.0,
    "use_sliding_window_attention": True,
    "sliding_window_size": 4096,
}
SHAPES = {
    "gemma2-2b": {
        "model": GEMMA2_2B,
        "layer": 12,
        "batch": 16,
        "sequence": 1024,
        "d_sae": 16384,
        "k": 64,
        "sae_batch": 4096,
    },
    "small": {
        "model": {
            **GEMMA2_2B,
            "vocabulary_size": 4096,
            "num_layers": 4,
            "num_query_heads": 4,
            "num_key_value_heads": 2,
            "hidden_dim": 256,
            "intermediate_dim": 1024,
            "head_dim": 64,
            "sliding_window_size": 128,
        },
        "layer": 2,
        "batch": 8,
        "sequence": 256,
        "d_sae": 2048,
        "k": 32,
        "sae_batch": 1024,
    },
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _sequences(rng: np.random.Generator, count: int, sequence: int, vocabulary: int):
    for _ in range(count):
        ids = rng.integers(3, vocabulary, size=sequence, dtype=np.int32)
        ids[0] = 2  # BOS, dropped from the rows like the real job does
        yield ids, sequence


def _timed(phase) -> dict[str, float]:
    rss = _rss_mb()
    memory = StageMemory()
    start = time.perf_counter()
    tokens = phase()
    seconds = time.perf_counter() - start
    return {
        "tokens_per_second": tokens / seconds,
        "seconds": seconds,
        "rss_start_mb": rss,
        "rss_end_mb": _rss_mb(),
        "peak_rss_mb": memory.summary().get("peak_host_memory_bytes", 0) / 2**20,
    }


def main() -> None:
    import keras_hub

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="small")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batches", type=int, default=8, help="LM batches per phase")
    parser.add_argument("--batch", type=int, default=0, help="sequences per LM batch (0: shape's)")
    parser.add_argument("--sequence", type=int, default=0, help="tokens per sequence (0: shape's)")
    parser.add_argument(
        "--buffer", type=int, default=0, help="shuffle buffer rows (0: twice the SAE batch)"
    )
    args = parser.parse_args()
    shape = dict(SHAPES[args.shapes])
    shape["batch"] = args.batch or shape["batch"]
    shape["sequence"] = args.sequence or shape["sequence"]
    started, build_memory = time.perf_counter(), StageMemory()
    batch, sequence, layer = shape["batch"], shape["sequence"], shape["layer"]
    vocabulary = shape["model"]["vocabulary_size"]
    tokens_per_batch = batch * sequence
    backbone = keras_hub.models.GemmaBackbone(**shape["model"], dtype=args.dtype)
    built_s = time.perf_counter() - started
    build_peak_mb = build_memory.summary().get("peak_host_memory_bytes", 0) / 2**20
    mesh = sharding.make_mesh()
    tap = lm.ActivationTap(backbone, [layer], mesh)
    d_model = tap.hidden_dim
    rng = np.random.default_rng(0)

    ids = jax.device_put(
        rng.integers(3, vocabulary, size=(batch, sequence), dtype=np.int32),
        sharding.batch_sharding(mesh),
    )
    mask = jax.device_put(np.ones((batch, sequence), bool), sharding.batch_sharding(mesh))
    jax.block_until_ready(tap.device_forward(ids, mask))  # compile

    def forward() -> int:
        for _ in range(args.batches):
            out = tap.device_forward(ids, mask)
        jax.block_until_ready(out)
        return args.batches * tokens_per_batch

    def extract() -> int:
        with tempfile.TemporaryDirectory() as tmp:
            writer = activation_store.PartWriter(
                activation_store.part_uri(tmp, 0),
                [layer],
                d_model,
                args.batches * tokens_per_batch,
                4096,
                "bfloat16",
            )
            sequences = _sequences(rng, args.batches * batch, sequence, vocabulary)
            for rows in activations.activation_chunks(sequences, tap, batch, bos_id=2):
                writer.append(rows)
            writer.close()
        return args.batches * tokens_per_batch

    spec = SaeSpec(architecture="topk", k=shape["k"], learning_rate=1e-4)
    sae = arch.build(spec, d_model, d_sae=shape["d_sae"], matmul_dtype=args.dtype)
    train = TrainConfig(steps=10**6, lr_warmup_steps=0, lr_decay_fraction=0.0)
    members = {"topk": Member(sae, train, (0, d_model))}
    trainer = StepTrainer(members, mesh, dead_window_tokens=10**12)
    first = np.random.default_rng(1).normal(size=(shape["sae_batch"], d_model)).astype(np.float32)
    state = {"value": trainer.init_state(0, first)}
    jax.block_until_ready(trainer.step(state["value"], first))  # compile (state is donated)
    state["value"] = trainer.init_state(0, first)

    waits: dict[str, float] = {}

    def extract_train() -> int:
        # The train job's streaming path: forwards kept in flight, the shuffle buffer in the
        # model's dtype, each step dispatched while the host prepares the next batch.
        sequences = _sequences(rng, args.batches * batch, sequence, vocabulary)
        dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32
        buffer = activations.ShuffleBuffer(args.buffer or 2 * shape["sae_batch"], d_model, 0, dtype)
        stream = activations.LockstepBatches(sequences, tap, buffer, batch, shape["sae_batch"], 2)
        metrics, waited, steps = None, 0.0, 0
        while True:
            asked = time.perf_counter()
            rows = next(stream, None)
            waited += time.perf_counter() - asked
            if rows is None:
                break
            state["value"], metrics = trainer.step(state["value"], rows)
            steps += 1
        jax.block_until_ready(metrics)
        waits["extract_train"], waits["steps"] = waited, steps
        return args.batches * tokens_per_batch

    results = {"forward": _timed(forward), "extract": _timed(extract)}
    results["extract_train"] = _timed(extract_train)
    # The share of the streaming loop's time spent getting the next batch: the step waiting
    # on the host (its model forwards included, which the device runs between steps).
    results["extract_train"]["data_wait_fraction"] = (
        waits["extract_train"] / results["extract_train"]["seconds"]
    )
    results["extract_train"]["sae_steps"] = int(waits["steps"])
    reference = results["forward"]["tokens_per_second"]
    for name in ("extract", "extract_train"):
        results[name]["vs_forward"] = results[name]["tokens_per_second"] / reference
    results["extract_train"]["vs_extract"] = (
        results["extract_train"]["tokens_per_second"] / results["extract"]["tokens_per_second"]
    )
    device = jax.devices()[0]
    print(
        json.dumps(
            {
                "benchmark": "extract",
                "date": date.today().isoformat(),
                "device": f"{device.platform}:{device.device_kind} x{len(jax.devices())}",
                "host": platform.node(),
                "jax": jax.__version__,
                "shapes": {
                    "shapes": args.shapes,
                    "dtype": args.dtype,
                    "layer": layer,
                    "batch": batch,
                    "sequence": sequence,
                    "d_model": d_model,
                    "lm_batches_per_phase": args.batches,
                    "sae": {"architecture": "topk", "d_sae": shape["d_sae"], "k": shape["k"]},
                },
                "results": results,
                "model_build_seconds": built_s,
                "model_build_peak_rss_mb": build_peak_mb,
                "tapped_weights_mb": tap.weight_bytes / 2**20,
                "wall_seconds": time.perf_counter() - started,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
