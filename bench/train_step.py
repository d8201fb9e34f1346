"""Train-step throughput of each SAE architecture, against a plain matmul reference in the same
run, printed as JSON.

    python bench/train_step.py                      # small shapes: runs anywhere (CPU)
    python bench/train_step.py --shapes issue --dtype bfloat16 --peak-tflops 989  # H100

A step is the full `StepTrainer.step` (forward, backward, Adam, decoder renormalisation, dead and
dense tracking, the non-finite guard) on a batch already on the device; steps cycle through
`--fresh-batches` distinct batches, the dead window is one batch and `--dead-fraction` of the
latents are kept from firing, so AuxK (top-k and decoder over the dead latents) runs as it does
while latents are dying. The reference does
the five dense matmuls a ReLU SAE step needs (10*B*d*m FLOPs) and nothing else, so
`vs_reference` says how close a step comes to pure matmul speed on this machine; MFU is given
when the peak is known. `transcoder:<architecture>` and `skip_transcoder:<architecture>` time
the same architecture as a transcoder (input and target columns of a two-site row).
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
    parser.add_argument(
        "--architectures",
        default="relu,topk,batchtopk,matryoshka_batchtopk,jumprelu,skip_transcoder:topk",
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--fresh-batches", type=int, default=4, help="distinct batches cycled")
    parser.add_argument(
        "--dead-fraction",
        type=float,
        default=0.25,
        help="latents made dead (encoder bias -1e3) so AuxK runs as while latents are dying",
    )
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
        kind, _, architecture = name.rpartition(":")
        kwargs = {"k": k} if "topk" in architecture else {}
        if architecture == "matryoshka_batchtopk":
            kwargs["matryoshka_widths"] = (m // 16, m // 4, m)
        spec = SaeSpec(architecture=architecture, kind=kind or "sae", learning_rate=1e-4, **kwargs)
        sae = arch.build(spec, d, d_sae=m, matmul_dtype=args.dtype)
        train = TrainConfig(steps=1000, lr_warmup_steps=0, lr_decay_fraction=0.0)
        targets = (d, 2 * d) if kind else None
        members = {name: Member(sae, train, (0, d), targets)}
        # A dead window of one batch: latents that did not fire in it are dead, AuxK runs.
        trainer = StepTrainer(members, mesh, dead_window_tokens=batch)
        rng = np.random.default_rng(0)
        width = 2 * d if kind else d
        rows = [
            rng.normal(size=(batch, width)).astype(np.float32) for _ in range(args.fresh_batches)
        ]
        state = trainer.init_state(0, rows[0])[name]
        # Random rows light up nearly every latent; dead ones are what makes AuxK run.
        dead = int(args.dead_fraction * m)
        params = {**state.params, "b_enc": state.params["b_enc"].at[:dead].set(-1e3)}
        states = {"value": {name: state.replace(params=params)}, "next": 0}
        batches = [trainer.put_batch(r) for r in rows]

        def step(states=states, trainer=trainer, batches=batches):
            x = batches[states["next"] % len(batches)]
            states["next"] += 1
            states["value"], metrics = trainer.step(states["value"], x)
            return metrics

        seconds = _time(step, args.repeats)
        entry = {
            "architecture": name,
            "auxk_ran": bool(float(step().get(f"{name}/auxk", 0.0)) > 0),
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
