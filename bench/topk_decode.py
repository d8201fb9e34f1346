"""TopK's decode from (values, indices): the gathered sparse decode (k decoder rows per token)
against the dense one (the latents scattered into [tokens, latents], one matmul), forward and
backward, in the same run, printed as JSON.

    python bench/topk_decode.py                  # small shapes (CPU)
    python bench/topk_decode.py --shapes issue   # 4096 tokens, d 2304, 16384 latents, k 64

The faster per backend and shape is what `sparse_ops.DECODE_METHOD` should hold. `flops` counts the
multiply-adds each does (machine-independent): 2 B k d for the gather, 2 B m d for the matmul.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date

import jax
import jax.numpy as jnp
from train_step import _time

from sae.arch import sparse_ops

SHAPES = {
    "small": {"tokens": 1024, "d_model": 256, "latents": 2048, "k": 32},
    "issue": {"tokens": 4096, "d_model": 2304, "latents": 16384, "k": 64},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="small")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    shape = SHAPES[args.shapes]
    t, d, m, k = shape["tokens"], shape["d_model"], shape["latents"], shape["k"]
    keys = jax.random.split(jax.random.key(0), 3)
    pre = jax.random.normal(keys[0], (t, m))
    values, indices = jax.lax.top_k(pre, k)
    values = jax.nn.relu(values)
    w_dec = jax.random.normal(keys[1], (m, d)).astype(args.dtype)
    target = jax.random.normal(keys[2], (t, d))
    results = {}
    for method in ("sparse", "dense"):

        def loss(values, w_dec, method=method):
            out = sparse_ops.decode(values, indices, w_dec, method)
            return jnp.sum((out - target) ** 2)

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        seconds = _time(lambda step=step: step(values, w_dec), args.repeats)
        results[method] = {
            "seconds": seconds,
            "multiply_adds": 2 * t * (k if method == "sparse" else m) * d,
        }
    results["dense"]["sparse_over_dense_time"] = (
        results["sparse"]["seconds"] / results["dense"]["seconds"]
    )
    print(
        json.dumps(
            {
                "benchmark": "topk_decode",
                "date": date.today().isoformat(),
                "backend": jax.default_backend(),
                "device": jax.devices()[0].device_kind,
                "machine": platform.machine(),
                "shapes": {**shape, "dtype": args.dtype},
                "default": sparse_ops._decode_method(m, k),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
