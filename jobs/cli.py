"""`gemma-sae`: one console command with a subcommand per stage, plus `pipeline`.

    gemma-sae pipeline                          # the tiny local run (configs/local.yaml)
    gemma-sae train --config configs/gemma2-2b-v5e-8.yaml train.steps=1000
    gemma-sae steer --sae runs/local/sae/topk-L2-x8-k32 --feature 3 --strength 40 --prompt Hi

Stages share the config and its overrides; tools (`steer`, `import-gemma-scope`, `submit`,
`retrain`) take their own arguments (`gemma-sae steer --help`).

Problems the user can fix print one line (`error: ...`) and exit 2; a preempted training
run exits 75 so that a supervisor retries it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

STAGES = ("demo", "tokenize", "extract", "train", "report", "pipeline")
# Tool commands: their module's `main(argv)` parses the rest of the command line itself.
TOOLS = {
    "steer": "jobs.steer",
    "import-gemma-scope": "jobs.import_sae",
    "export-neuronpedia": "jobs.export_neuronpedia",
    "export-transformers": "jobs.export_transformers",
    "submit": "jobs.cloud.submit",
    "retrain": "jobs.cloud.retrain",
}


def _prepare_environment() -> None:
    # Both must be set before JAX or Keras start. On a TPU or GPU host the CPU device count
    # is irrelevant (JAX picks the accelerator); locally it gives the 8-device mesh.
    devices = os.environ.get("GEMMA_SAE_CPU_DEVICES", "8")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-sae",
        description="Train sparse autoencoders on Gemma activations.",
        epilog="tools, each with its own arguments (see `gemma-sae TOOL --help`): "
        + ", ".join(TOOLS),
    )
    parser.add_argument("stage", choices=STAGES, help="which stage to run")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. train.steps=100 workdir=gs://bucket/run",
    )
    parser.add_argument("--config", "-c", help="YAML config (default: the tiny local run)")
    parser.add_argument(
        "--force", action="store_true", help="run stages even when their manifests match"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:
        return _guarded(lambda: _run_tool(argv[0], argv[1:]))
    # Intermixed: --config and --force may come anywhere among the overrides.
    args = _parser().parse_intermixed_args(argv)

    def stage() -> None:
        from sae.config import load
        from sae.sharding import init_distributed

        init_distributed()
        _dispatch(args.stage, load(args.config, args.overrides), args.force)

    return _guarded(stage)


def _guarded(body: Callable[[], None]) -> int:
    """Run a stage or tool with the exit codes the supervisor and users rely on."""
    _prepare_environment()
    from sae.errors import PREEMPTED_EXIT_CODE, Preempted, SaeError

    try:
        body()
    except SaeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Preempted as error:
        print(f"preempted: {error}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        return 130
    return 0


def _run_tool(name: str, argv: list[str]) -> None:
    import importlib

    # Imported only when asked for, so one tool's imports never slow or break the others.
    importlib.import_module(TOOLS[name]).main(argv)


def _dispatch(stage: str, config, force: bool) -> None:
    import importlib

    module = importlib.import_module(f"jobs.{stage}")
    module.run(config, force)


if __name__ == "__main__":
    sys.exit(main())
