"""`gemma-sae retrain`: one scheduled retraining run under a base URI (local or gs://).

    gemma-sae retrain --config configs/gemma2-2b-v5e-8.yaml workdir=gs://my-bucket/retrain \\
      'tokenize.input=gs://my-bucket/corpus/*.jsonl' model.preset=gs://my-bucket/presets/g2b

The config's `workdir` is the base. Each run is a whole pipeline workdir
`<base>/runs/<YYYYMMDD-HHMMSS>/` (UTC) and `<base>/LATEST` names the last good one. A run:

1. does nothing (exit 0) when neither the config nor what it reads from outside (corpus files,
   model preset, tokenizer, .npy activations) changed since LATEST's run;
2. runs the stages of `pipeline` in its own workdir. LATEST's data outputs are copied over
   first (the demo corpus and model always, the token shards while the external inputs are
   unchanged) and each stage's own manifest check decides: up to date, skipped; otherwise
   redone, and nothing more is copied. So new corpus files re-tokenize the whole corpus
   (packing and the held-out split are corpus-wide), a config change alone re-tokenizes
   nothing, and an activation store (train.source=store) is extracted anew in every run;
3. trains warm-started from LATEST's SAEs (`train.init_from`: the final checkpoint's weights
   and input scale; the optimizer state and learning-rate schedule start afresh);
4. writes LATEST last, after every manifest of the run. A failed run writes `<run>/FAILED`
   (its one-line error) and leaves LATEST and every earlier run as they were. With
   `--promotion-request` (the scheduled retraining) it writes `<base>/PROMOTE` instead, the run
   and the LATEST version it read ("RUN VERSION"), and the retraining build moves LATEST once
   every worker has succeeded (infra/templates/retrain.sh.tftpl): the TPU runtime account may
   read LATEST but not write it.

Both pointers (LATEST, and STARTED below) are rewritten only if they are as this run read them
(a generation precondition on GCS): of two retrains at once, one starts a run, and a run that
finishes after another retrain moved LATEST fails with a one-line error instead of undoing it.

A run stopped by a preemption (exit 75) is resumed by the next `retrain` with the same config
and inputs (`<base>/STARTED` names the run last started): its finished stages skip by their
manifests and training resumes from its checkpoint. `--force` makes a run and redoes every
stage; `--cold` trains from scratch (after changing the SAEs' shapes, which a warm start
refuses). With several hosts, process 0 plans the run and writes the pointers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jobs import demo, extract, report, tokenize, train
from sae.config import PipelineConfig, load
from sae.data import corpus
from sae.errors import ConfigError, InputError, Preempted, SaeError
from sae.io import manifest, storage
from sae.progress import log
from sae.sharding import init_distributed

RUNS = "runs"
LATEST = "LATEST"
STARTED = "STARTED"
PROMOTE = "PROMOTE"
RECORD = "retrain.json"
FAILED = "FAILED"
_STAMP = "%Y%m%d-%H%M%S"
_PLAN_BYTES = 8192  # the plan process 0 sends the other hosts, as JSON


class RunFailed(SaeError):
    """A stage of a retraining run failed; LATEST still names the previous good run."""


@dataclasses.dataclass(frozen=True)
class Step:
    """A stage of the run, the outputs it writes, and whether LATEST's may be carried over:
    `carried`, and with `external`, only while the external inputs are unchanged."""

    name: str
    run: Callable[[PipelineConfig, bool], None]
    outputs: Callable[[PipelineConfig], list[str]]
    carried: bool
    external: bool = False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-sae retrain",
        description="One retraining run: a new dated run under the base (the config's workdir) "
        "that warm-starts from the LATEST good run and becomes LATEST when it succeeds.",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides; workdir=BASE is where the runs and LATEST live",
    )
    parser.add_argument("--config", "-c", help="YAML config (default: the tiny local run)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="make a run and redo every stage even if nothing is new",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="train from scratch (train.init_from as configured), e.g. after changing the SAEs",
    )
    parser.add_argument(
        "--promotion-request",
        action="store_true",
        help="leave LATEST to the retraining build: on success write BASE/PROMOTE ('RUN "
        "VERSION') instead, which it turns into LATEST once every worker succeeded",
    )
    return parser


def main(argv: list[str]) -> None:
    # Intermixed: flags may come between the overrides, as on the stages' command line.
    args = _parser().parse_intermixed_args(argv)
    init_distributed()
    retrain(
        load(args.config, args.overrides),
        force=args.force,
        cold=args.cold,
        promotion_request=args.promotion_request,
    )


def run_uri(base: str, name: str) -> str:
    return storage.join(base, RUNS, name)


def read_latest(base: str) -> str | None:
    """The name of the last good run under `base`, or None before the first one."""
    return _read_pointer(storage.join(base, LATEST))[0]


def _read_pointer(uri: str) -> tuple[str | None, str]:
    """A pointer's run name (None when there is none) and its version, so that it is
    rewritten only if nobody else did so meanwhile (storage.write_bytes_if)."""
    data, version = storage.read_versioned(uri)
    return (data.decode("utf-8").strip() or None) if data else None, version


def _write_pointer(uri: str, name: str, version: str, clash: str) -> None:
    try:
        storage.write_bytes_if(uri, (name + "\n").encode(), version)
    except storage.Changed:
        now = _read_pointer(uri)[0]
        raise RunFailed(
            f"{clash} ({uri} now names run {now}: another retrain got there first)"
        ) from None


def retrain(
    config: PipelineConfig, force: bool = False, cold: bool = False, promotion_request: bool = False
) -> str | None:
    """One run under `config.workdir`: its name, or None when nothing was new.
    `promotion_request`: on success write `<base>/PROMOTE` for the retraining build to make
    the run LATEST, rather than writing LATEST."""
    _check_outputs_stay_in_the_run(config)
    plan = _shared_plan(config, force, cold)
    base, name, latest = config.workdir, plan["run"], plan["latest"]
    if name is None:
        log("retrain", f"nothing new since run {latest} (same config and inputs); LATEST stays")
        return None
    run_config = _in_run(config, run_uri(base, name), plan["init_from"])
    if plan["resume"]:
        log("retrain", f"resuming the unfinished run {name}")
    else:
        log("retrain", f"new run {run_config.workdir} (LATEST: {latest or 'none yet'})")
        if _primary():
            # Claimed first: of two retrains that planned at once, one starts.
            _write_pointer(
                storage.join(base, STARTED),
                name,
                plan["started_version"],
                f"run {name} does not start",
            )
            storage.write_json(storage.join(run_config.workdir, RECORD), plan["record"])
    if plan["init_from"]:
        log("retrain", f"warm start from {plan['init_from']}")
    carry_from = plan["carry_from"]
    previous = _in_run(config, run_uri(base, carry_from), "") if carry_from else None
    try:
        _run_steps(run_config, previous, plan["same_sources"], force)
    except (Preempted, KeyboardInterrupt):
        raise  # resumable: no FAILED marker
    except Exception as error:
        message = _one_line(error)
        if _primary():
            # Best effort: the run's own error is the one to report.
            with contextlib.suppress(SaeError):
                storage.write_text(storage.join(run_config.workdir, FAILED), message + "\n")
        failed = RunFailed(f"run {name} failed, LATEST still names {latest or 'no run'}: {message}")
        if isinstance(error, SaeError):
            raise failed from None
        raise failed from error
    _sync("retrain: every stage finished")
    if promotion_request:
        if _primary():
            request = f"{name} {plan['latest_version']}\n"
            storage.write_text(storage.join(base, PROMOTE), request)
        log("retrain", f"done: run {name} finished; {PROMOTE} asks the build to make it LATEST")
        return name
    if _primary():
        _write_pointer(
            storage.join(base, LATEST),
            name,
            plan["latest_version"],
            f"run {name} finished at {run_config.workdir} but is not LATEST",
        )
    log("retrain", f"done: LATEST names run {name} ({run_config.workdir})")
    return name


def _shared_plan(config: PipelineConfig, force: bool, cold: bool) -> dict[str, Any]:
    """Process 0 decides (one run name for all hosts); the others follow, or stop with its
    error."""
    plan, error = None, None
    if _primary():
        try:
            plan = _plan(config, force, cold)
        except SaeError as caught:
            plan, error = {"error": str(caught)}, caught
    plan = _agree(plan)
    if error is not None:
        raise error
    if "error" in plan:
        raise SaeError(plan["error"])
    return plan


def _plan(config: PipelineConfig, force: bool, cold: bool) -> dict[str, Any]:
    """What this invocation does: nothing, resume the run last started, or start a new one."""
    base = config.workdir
    latest, latest_version = _read_pointer(storage.join(base, LATEST))
    previous = _read_record(run_uri(base, latest)) if latest else None
    sources = external_sources(config)
    wanted = _comparable(config)
    unchanged = previous is not None and previous.get("sources") == sources
    if unchanged and previous.get("config") == wanted and not (force or cold):
        return {"run": None, "latest": latest}
    init_from = config.train.init_from
    if latest and not cold:
        init_from = storage.join(run_uri(base, latest), "sae")
        if manifest.read(init_from) is None:
            raise InputError(
                f"LATEST names run {latest} but {init_from} holds no finished train output; "
                "point LATEST at a good run or retrain with --cold"
            )
    request = {"config": wanted, "sources": sources, "init_from": init_from, "latest": latest}
    plan = {
        "latest": latest,
        "latest_version": latest_version,
        "init_from": init_from,
        "carry_from": None if force else latest,
        "same_sources": unchanged,
    }
    started, plan["started_version"] = _read_pointer(storage.join(base, STARTED))
    if started and started > (latest or "") and _resumable(run_uri(base, started), request):
        return {**plan, "run": started, "resume": True}
    name = _new_name(base)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = {**request, "run": name, "started_at": started_at}
    return {**plan, "run": name, "resume": False, "record": record}


def _resumable(uri: str, request: dict[str, Any]) -> bool:
    """An unfinished, unfailed run that was started for exactly this request."""
    if storage.exists(storage.join(uri, FAILED)):
        return False
    record = _read_record(uri)
    return record is not None and all(record.get(k) == v for k, v in request.items())


def external_sources(config: PipelineConfig) -> dict[str, Any]:
    """Fingerprints of what a run reads from outside itself; the demo's corpus and model are
    made from the config, so they have none."""
    sources: dict[str, Any] = {}
    if config.tokenize.input:
        files = corpus.find_corpus_files(config.corpus_uri)
        sources["corpus"] = {uri: storage.fingerprint(uri) for uri in files}
    if config.model.preset:
        sources["model"] = storage.fingerprint_tree(config.model.preset)
    if config.tokenize.tokenizer:
        sources["tokenizer"] = storage.fingerprint_tree(config.tokenize.tokenizer)
    if config.train.source == "npy":
        files = storage.match_files(config.train.activations)
        sources["activations"] = {uri: storage.fingerprint(uri) for uri in files}
    return sources


def _comparable(config: PipelineConfig) -> dict[str, Any]:
    """The config as two runs compare it: without the run's own workdir and warm start."""
    values = dataclasses.asdict(config)
    del values["workdir"]
    del values["train"]["init_from"]
    return json.loads(json.dumps(values))  # as the record stores it (lists, not tuples)


def _check_outputs_stay_in_the_run(config: PipelineConfig) -> None:
    # A stage writing outside the run could change what an earlier good run reads.
    if config.demo.enabled and config.model.preset:
        raise ConfigError(
            "retrain makes the demo model inside each run: leave model.preset empty with "
            "demo.enabled, or set demo.enabled=false"
        )
    if config.train.source == "store" and config.train.activations:
        raise ConfigError(
            "retrain extracts each run's own activation store: leave train.activations empty"
        )


def _in_run(config: PipelineConfig, workdir: str, init_from: str) -> PipelineConfig:
    train_config = dataclasses.replace(config.train, init_from=init_from)
    run_config = dataclasses.replace(config, workdir=workdir, train=train_config)
    run_config.validate()
    return run_config


def _steps(config: PipelineConfig) -> list[Step]:
    """The stages of `pipeline`, in its order."""
    steps = []
    if config.demo.enabled:
        steps.append(
            Step(
                "demo",
                demo.run,
                lambda c: [c.demo_corpus_dir, c.demo_labels_dir, c.preset_uri],
                True,
            )
        )
    # Copying the tokens is worth it only while the corpus and tokenizer are the same.
    steps.append(Step("tokenize", tokenize.run, lambda c: [c.tokens_uri], True, external=True))
    if config.train.source == "store":
        # Not carried: a store is too large to copy through this host, and new tokens (the
        # usual reason for a run) make a new one anyway.
        steps.append(Step("extract", extract.run, lambda c: [c.activations_uri], False))
    steps.append(Step("train", train.run, lambda c: [c.sae_uri], False))
    steps.append(Step("report", report.run, lambda c: [c.report_uri], False))
    return steps


def _run_steps(
    config: PipelineConfig, previous: PipelineConfig | None, same_sources: bool, force: bool
) -> None:
    """Run every stage; while the stages so far were reused, copy the previous run's output of
    the next carried stage first (its manifest check then decides whether it is current)."""
    carrying = previous is not None and not force
    for step in _steps(config):
        outputs = step.outputs(config)
        carried = carrying and step.carried and (same_sources or not step.external)
        if carried and _primary():
            for old, new in zip(step.outputs(previous), outputs, strict=True):
                _carry_over(old, new, previous.workdir, config.workdir)
        _sync(f"retrain: {step.name} outputs carried over")
        before = [manifest.read(uri) for uri in outputs] if carried else None
        step.run(config, force)
        carrying = carried and [manifest.read(uri) for uri in outputs] == before


def _carry_over(old: str, new: str, old_root: str, new_root: str) -> None:
    """Copy a finished output of the previous run, its manifest last, with the previous run's
    URIs in it moved to this run. An output this run already finished is left alone."""
    found = manifest.read(old)
    if found is None or manifest.read(new) is not None:
        return
    storage.delete_tree(new)  # what an interrupted copy left
    for uri in storage.list_files(old):
        relative = uri[len(old) :].lstrip("/")
        if relative != manifest.MANIFEST_NAME:
            with (
                storage.open_read(uri) as src,
                storage.open_write(storage.join(new, relative)) as dst,
            ):
                shutil.copyfileobj(src, dst, 16 << 20)
    storage.write_json(manifest.manifest_uri(new), _moved(found, old_root, new_root))
    log("retrain", f"carried over {old}")


def _moved(value: Any, old_root: str, new_root: str) -> Any:
    """`value` with every string that is `old_root` or a path below it moved to `new_root`."""
    old_root, new_root = old_root.rstrip("/"), new_root.rstrip("/")
    if isinstance(value, str):
        if value == old_root or value.startswith(old_root + "/"):
            return new_root + value[len(old_root) :]
        return value
    if isinstance(value, dict):
        return {
            _moved(k, old_root, new_root): _moved(v, old_root, new_root) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_moved(v, old_root, new_root) for v in value]
    return value


def _new_name(base: str, now: float | None = None) -> str:
    """A fresh UTC timestamp name; the next free second if a run of this second exists."""
    moment = int(time.time() if now is None else now)
    while storage.exists(run_uri(base, time.strftime(_STAMP, time.gmtime(moment)))):
        moment += 1
    return time.strftime(_STAMP, time.gmtime(moment))


def _read_record(uri: str) -> dict[str, Any] | None:
    record = storage.join(uri, RECORD)
    return storage.read_json(record) if storage.exists(record) else None


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return first if isinstance(error, SaeError) else f"{type(error).__name__}: {first}"


def _primary() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _agree(plan: dict[str, Any] | None) -> dict[str, Any]:
    """Process 0's plan on every host (each would otherwise pick its own run name)."""
    if jax.process_count() == 1:
        assert plan is not None
        return plan
    from jax.experimental import multihost_utils

    buffer = np.zeros(_PLAN_BYTES, np.uint8)
    if plan is not None:
        blob = json.dumps(plan).encode()
        if len(blob) > _PLAN_BYTES:
            raise ConfigError(f"the retraining plan is longer than {_PLAN_BYTES} bytes")
        buffer[: len(blob)] = np.frombuffer(blob, np.uint8)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return json.loads(bytes(shared).rstrip(b"\0"))
