"""Train-step throughput of each SAE architecture, against a plain matmul reference in the same
run, printed as JSON.

    python bench/train_step.py                      # small shapes: runs anywhere (CPU)
    python bench/train_step.py --shapes issue --dtype bfloat16 --peak-tflops 989  # H100

A step is the full `StepTrainer.step` (forward, backward, Adam, decoder renormalisation, dead and
dense tracking) on a batch already on the device. The reference does the five dense matmuls a
ReLU SAE step needs (10*B*d*m FLOPs) and nothing else, so `vs_reference` says how close a step
comes to pure matmul speed on this machine; MFU is given when the peak is known.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date

import jax
import jax.numpy as jnp
import numpy as np

from sae import arch, sharding
from sae.arch import SaeSpec
from sae.config import TrainConfig
from sae.training.step import Member, StepTrainer

SHAPES = {
    "small": {"d_model": 256, "d_sae": 2048, "batch": 1024, "k": 32},
    "issue": {"d_model": 2304, "d_sae": 16384, "batch": 4096, "k": 64},
}


def _time(fn, repeats: int) -> float:
    """Median seconds per call, after a warm-up call (compilation)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def reference_step(batch: int, d: int, m: int, dtype: str):
    """The five [B,d]x[d,m]-sized matmuls of a dense SAE step, nothing else."""
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (batch, d), dtype)
    w_enc = jax.random.normal(keys[1], (d, m), dtype)
    w_dec = jax.random.normal(keys[2], (m, d), dtype)

    @jax.jit
    def step(x, w_enc, w_dec):
        f32 = jnp.float32
        h = jnp.matmul(x, w_enc, preferred_element_type=f32).astype(dtype)
        y = jnp.matmul(h, w_dec, preferred_element_type=f32).astype(dtype)
        grad_h = jnp.matmul(y, w_dec.T, preferred_element_type=f32).astype(dtype)
        grad_dec = jnp.matmul(h.T, y, preferred_element_type=f32)
        grad_enc = jnp.matmul(x.T, grad_h, preferred_element_type=f32)
        return grad_dec.sum() + grad_enc.sum()

    return lambda: step(x, w_enc, w_dec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="small")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--architectures", default="relu,topk,batchtopk,jumprelu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak, for MFU")
    args = parser.parse_args()
    shape = SHAPES[args.shapes]
    batch, d, m, k = shape["batch"], shape["d_model"], shape["d_sae"], shape["k"]
    device = jax.devices()[0]
    mesh = sharding.make_mesh(1, 1, devices=[device])
    flops = 10 * batch * d * m
    reference = _time(reference_step(batch, d, m, args.dtype), args.repeats)
    results = []
    for name in args.architectures.split(","):
        kwargs = {"k": k} if name in ("topk", "batchtopk") else {}
        spec = SaeSpec(architecture=name, learning_rate=1e-4, **kwargs)
        sae = arch.build(spec, d, d_sae=m, matmul_dtype=args.dtype)
        members = {
            name: Member(
                sae, TrainConfig(steps=1000, lr_warmup_steps=0, lr_decay_fraction=0.0), (0, d)
            )
        }
        trainer = StepTrainer(members, mesh, dead_window_tokens=10**12)
        rows = np.random.default_rng(0).normal(size=(batch, d)).astype(np.float32)
        states = {"value": trainer.init_state(0, rows)}
        x = trainer.put_batch(rows)

        def step(states=states, trainer=trainer, x=x):
            states["value"], metrics = trainer.step(states["value"], x)
            return metrics

        seconds = _time(step, args.repeats)
        entry = {
            "architecture": name,
            "seconds_per_step": seconds,
            "tokens_per_second": batch / seconds,
            "vs_reference": reference / seconds,
        }
        if args.peak_tflops:
            entry["mfu_at_10Bdm"] = flops / seconds / (args.peak_tflops * 1e12)
        results.append(entry)
    print(
        json.dumps(
            {
                "benchmark": "train_step",
                "date": date.today().isoformat(),
                "device": f"{device.platform}:{device.device_kind}",
                "host": platform.node(),
                "jax": jax.__version__,
                "shapes": {**shape, "dtype": args.dtype},
                "reference": {
                    "what": "5 dense matmuls of a ReLU SAE step (10*B*d*m FLOPs)",
                    "seconds_per_step": reference,
                    "tokens_per_second": batch / reference,
                },
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
