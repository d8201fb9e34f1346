"""The markdown tables docs/PERFORMANCE.md shows, from the benchmarks' JSON outputs.

python bench/table.py bench-results/train_step.json bench-results/extract.json ...
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _train_step(result: dict[str, Any]) -> list[str]:
    ref = result["reference"]
    lines = [
        f"### Train step, {result['device']}, {result['date']}, shapes {result['shapes']}",
        "",
        "| architecture | s/step | tokens/s | vs reference | MFU | AuxK ran |",
        "|---|---|---|---|---|---|",
        f"| reference (5 matmuls) | {ref['seconds_per_step']:.4f} | "
        f"{ref['tokens_per_second']:,.0f} | 1.00 | | |",
    ]
    for entry in result["results"]:
        mfu = entry.get("mfu_at_10Bdm")
        lines.append(
            f"| {entry['architecture']} | {entry['seconds_per_step']:.4f} | "
            f"{entry['tokens_per_second']:,.0f} | {entry['vs_reference']:.2f} | "
            f"{'' if mfu is None else f'{mfu:.2f}'} | {'yes' if entry.get('auxk_ran') else ''} |"
        )
    return lines


def _extract(result: dict[str, Any]) -> list[str]:
    lines = [
        f"### Extraction, {result['device']}, {result['date']}, shapes {result['shapes']}",
        "",
        "| phase | tokens/s | vs forward | vs extract | data wait |",
        "|---|---|---|---|---|",
    ]
    for phase, entry in result["results"].items():
        vs_forward = entry.get("vs_forward", 1.0)
        vs_extract, wait = entry.get("vs_extract"), entry.get("data_wait_fraction")
        lines.append(
            f"| {phase} | {entry['tokens_per_second']:,.0f} | {vs_forward:.2f} | "
            f"{'' if vs_extract is None else f'{vs_extract:.2f}'} | "
            f"{'' if wait is None else f'{wait:.2f}'} |"
        )
    return lines


def _batch_cutoff(result: dict[str, Any]) -> list[str]:
    lines = [
        f"### BatchTopK cut-off, {result['device']}, {result['date']}, shapes {result['shapes']}",
        "",
        f"Default here: {result['default']}; one reduction pass {result['one_pass_seconds']:.5f} s.",
        "",
        "| method (digit bits:count) | passes | seconds | vs one pass |",
        "|---|---|---|---|",
    ]
    for entry in result["results"]:
        lines.append(
            f"| {entry['method']} | {entry['passes']} | {entry['seconds']:.5f} | "
            f"{entry['vs_one_pass']:.3f} |"
        )
    return lines


def main(paths: list[str]) -> None:
    render = {"train_step": _train_step, "extract": _extract, "batchtopk_select": _batch_cutoff}
    for path in paths:
        with open(path) as handle:
            result = json.load(handle)
        print("\n".join(render[result["benchmark"]](result)), end="\n\n")


if __name__ == "__main__":
    main(sys.argv[1:])
