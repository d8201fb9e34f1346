"""BatchTopK's exact batch cut-off (`sparse_ops.kth_largest`) by every radix select method,
against one plain reduction over the same array in the same run, printed as JSON.

    python bench/batch_cutoff.py                  # small shapes (CPU)
    python bench/batch_cutoff.py --shapes issue   # 4096 tokens x 16384 latents, k 64

A method is digit bits and how a pass counts: `compare` (2**bits - 1 counting reductions) or
`histogram` (one scatter-add into 2**bits counters). `passes` (reads of the activations) does
not depend on the machine; `vs_one_pass` = one reduction's time / the select's time. The fastest
method per backend is what `sparse_ops.SELECT_METHOD` should hold.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from datetime import date

import jax
import jax.numpy as jnp
import numpy as np
from train_step import _time

from sae.arch import sparse_ops

SHAPES = {
    "small": {"tokens": 1024, "latents": 2048, "k": 32},
    "issue": {"tokens": 4096, "latents": 16384, "k": 64},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="small")
    parser.add_argument("--methods", default="1:compare,4:compare,8:histogram,16:histogram")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    shape = SHAPES[args.shapes]
    tokens, latents, k = shape["tokens"], shape["latents"], shape["k"]
    values = jax.nn.relu(jax.random.normal(jax.random.key(0), (tokens, latents), jnp.float32))
    n = k * tokens
    want = float(np.sort(np.asarray(values).ravel())[-n])

    one_pass = jax.jit(lambda v: jnp.sum(v >= 0.5, dtype=jnp.int32))
    reference = _time(lambda: one_pass(values), args.repeats)
    rows = []
    for method in args.methods.split(","):
        bits, how = int(method.split(":")[0]), method.split(":")[1]
        histogram = how == "histogram"
        select = jax.jit(lambda v, b=bits, h=histogram: sparse_ops.kth_largest(v, n, b, h))
        got = float(select(values))
        if got != want:
            raise SystemExit(f"error: {method} selected {got}, not {want}")
        seconds = _time(lambda select=select: select(values), args.repeats)
        rows.append(
            {
                "method": method,
                "passes": math.ceil(31 / bits),
                "seconds": seconds,
                "vs_one_pass": reference / seconds,
            }
        )
    print(
        json.dumps(
            {
                "benchmark": "batchtopk_select",
                "date": date.today().isoformat(),
                "backend": jax.default_backend(),
                "device": jax.devices()[0].device_kind,
                "machine": platform.machine(),
                "shapes": shape,
                "one_pass_seconds": reference,
                "default": sparse_ops._default_method(tokens * latents),
                "results": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
