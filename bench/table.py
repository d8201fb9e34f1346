"""The markdown tables docs/PERFORMANCE.md shows, from the benchmarks' JSON outputs.

python bench/table.py bench-results/train_step.json bench-results/extract.json ...
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _maybe(value: float | None, spec: str) -> str:
    """A table cell: the number formatted, or empty when it was not measured."""
    return "" if value is None else format(value, spec)


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
    lines += [
        f"| {entry['architecture']} | {entry['seconds_per_step']:.4f} | "
        f"{entry['tokens_per_second']:,.0f} | {entry['vs_reference']:.2f} | "
        f"{_maybe(entry.get('mfu_at_10Bdm'), '.2f')} | {'yes' if entry.get('auxk_ran') else ''} |"
        for entry in result["results"]
    ]
    return lines


def _extract(result: dict[str, Any]) -> list[str]:
    lines = [
        f"### Extraction, {result['device']}, {result['date']}, shapes {result['shapes']}",
        "",
        "| phase | tokens/s | vs forward | vs extract | data wait |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {phase} | {entry['tokens_per_second']:,.0f} | {entry.get('vs_forward', 1.0):.2f} | "
        f"{_maybe(entry.get('vs_extract'), '.2f')} | "
        f"{_maybe(entry.get('data_wait_fraction'), '.2f')} |"
        for phase, entry in result["results"].items()
    ]
    return lines


def _batch_cutoff(result: dict[str, Any]) -> list[str]:
    lines = [
        f"### BatchTopK cut-off, {result['device']}, {result['date']}, shapes {result['shapes']}",
        "",
        f"Default here: {result['default']}; "
        f"one reduction pass {result['one_pass_seconds']:.5f} s.",
        "",
        "| method (digit bits:count) | passes | seconds | vs one pass |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {entry['method']} | {entry['passes']} | {entry['seconds']:.5f} | "
        f"{entry['vs_one_pass']:.3f} |"
        for entry in result["results"]
    ]
    return lines


def _topk_decode(result: dict[str, Any]) -> list[str]:
    found = result["results"]
    return [
        f"### TopK decode, {result['device']}, {result['date']}, shapes {result['shapes']}",
        "",
        f"Default here: {result['default']}.",
        "",
        "| decode | seconds (forward + backward) | multiply-adds |",
        "|---|---|---|",
        *(
            f"| {method} | {found[method]['seconds']:.5f} | {found[method]['multiply_adds']:,} |"
            for method in ("sparse", "dense")
        ),
    ]


def main(paths: list[str]) -> None:
    render = {
        "train_step": _train_step,
        "extract": _extract,
        "batchtopk_select": _batch_cutoff,
        "topk_decode": _topk_decode,
    }
    for path in paths:
        with open(path) as handle:
            result = json.load(handle)
        print("\n".join(render[result["benchmark"]](result)), end="\n\n")


if __name__ == "__main__":
    main(sys.argv[1:])
