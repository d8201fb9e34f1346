"""The Python API: fit SAEs on activations you already have, evaluate them, from a notebook
with no workdir, corpus or model. `sae.train(config)` (sae/training/run.py) is the whole
training stage; this module is the part that needs none of a stage's files."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from sae import sharding
from sae.analysis import evaluation
from sae.arch.spec import SaeSpec
from sae.config import TrainConfig
from sae.data import activation_files
from sae.errors import ConfigError, InputError
from sae.io import saelens
from sae.io.saelens import Sae
from sae.training import run
from sae.training.step import LoopHooks, StepTrainer, run_loop

Activations = np.ndarray | Iterable[np.ndarray]


class Trainer:
    """Fits one or several SAEs (a sweep, one step function) on activation rows.

        saes = Trainer(saes=[SaeSpec(architecture="topk", k=32)], d_model=512).fit(x, steps=2000)

    `saes` are SaeSpec (the config's `train.saes` items); the keyword arguments are
    TrainConfig fields (`batch_size`, `seed`, `lr_warmup_steps`, `matmul_dtype`,
    `mesh_data`, ...), checked like a config. The mesh defaults to every device.

    Transcoders (`SaeSpec(kind="transcoder")` or "skip_transcoder") learn to map the
    activations to `targets` (e.g. an MLP's input to its output):

        tc = Trainer(saes=[SaeSpec(architecture="topk", kind="transcoder")], d_model=512)
        (transcoder,) = tc.fit(mlp_in, steps=2000, targets=mlp_out)"""

    def __init__(self, saes: Sequence[SaeSpec], d_model: int, **train: Any) -> None:
        if "saes" in train or "steps" in train:
            raise ConfigError("give the SAEs as `saes` and the steps to fit()")
        try:
            self.train = TrainConfig(saes=list(saes), **train)
        except TypeError as error:  # an unknown keyword
            raise ConfigError(f"Trainer: {error}") from None
        self.d_model = d_model
        # What fit() logged: (step, metrics), every `log_every` steps.
        self.history: list[tuple[int, dict[str, float]]] = []

    def fit(
        self,
        activations: Activations,
        steps: int,
        log_every: int = 100,
        targets: Activations | None = None,
    ) -> list[Sae]:
        """Trains `steps` steps and returns the SAEs, in the order given, in raw activation
        units. `activations`: an array [tokens, d_model] in memory (batches drawn in a seeded
        random order, epochs repeating) or any iterator of [batch, d_model] arrays (one per
        step). `targets`: the transcoders' targets, row for row, in the same form (SAEs
        ignore them)."""
        cfg = dataclasses.replace(self.train, steps=steps, log_every=log_every)
        transcoders = [s.display_name() for s in cfg.saes if s.kind != "sae"]
        if transcoders and targets is None:
            raise ConfigError(f"{transcoders[0]} is a transcoder: fit() needs its targets")
        # Validated as a .npy run: in-memory rows are that source without the files.
        dataclasses.replace(cfg, source="npy", activations="(in memory)").validate()
        mesh = sharding.make_mesh(cfg.mesh_data, cfg.mesh_model)
        for index, spec in enumerate(cfg.saes):
            spec.check_against_model(f"saes[{index}]", self.d_model, mesh.devices.shape[1])
        paired = targets is not None
        members = run.build_members(cfg, self.d_model, by_site=False, with_targets=paired)
        trainer = StepTrainer(members, mesh, cfg.dead_window_tokens, cfg.max_skipped_steps)
        rows = self._batches(activations, cfg, targets)
        first = next(rows, None)
        if first is None:
            raise InputError("no activations to fit on")
        states = trainer.init_state(cfg.seed, first)

        def with_first() -> Iterator[np.ndarray]:
            yield first
            yield from rows

        hooks = LoopHooks(on_metrics=lambda step, metrics: self.history.append((step, metrics)))
        states = run_loop(trainer, states, with_first(), steps, log_every, steps, hooks)
        fitted = []
        for spec in cfg.saes:
            name = spec.display_name()
            provenance = saelens.Provenance(
                layer=spec.layer,
                model_preset="",
                model_name=None,
                context_size=None,
                dataset_path=None,
                training_tokens=steps * cfg.batch_size,
            )
            weights, sae_cfg = run.exported(
                members[name], states[name], provenance, name=name, activation_source="memory"
            )
            fitted.append(Sae.from_saved(weights, sae_cfg))
        return fitted

    def _batches(
        self, activations: Activations, cfg: TrainConfig, targets: Activations | None
    ) -> Iterator[np.ndarray]:
        """Batches of rows: the activations, or [activations | targets] side by side."""
        if isinstance(activations, np.ndarray | jax.Array):
            array = self._checked(np.asarray(activations))
            if targets is not None:
                if not isinstance(targets, np.ndarray | jax.Array):
                    raise InputError("targets must be an array when the activations are one")
                paired = self._checked(np.asarray(targets), "targets")
                if len(paired) != len(array):
                    raise InputError(f"{len(paired)} target rows for {len(array)} activation rows")
                array = np.concatenate([array, paired], axis=1)
            rows = activation_files.NpyRows.in_memory(array)
            return activation_files.random_batches(rows, cfg.batch_size, cfg.seed)
        batches = (self._checked(np.asarray(batch, np.float32)) for batch in activations)
        if targets is None:
            return batches
        if isinstance(targets, np.ndarray | jax.Array):
            raise InputError("targets must be an iterator when the activations are one")
        return (
            self._paired(batch, np.asarray(target, np.float32))
            for batch, target in zip(batches, targets, strict=False)
        )

    def _paired(self, batch: np.ndarray, target: np.ndarray) -> np.ndarray:
        target = self._checked(target, "targets")
        if len(target) != len(batch):
            raise InputError(f"a batch of {len(target)} targets for {len(batch)} activations")
        return np.concatenate([batch, target], axis=1)

    def _checked(self, batch: np.ndarray, what: str = "activations") -> np.ndarray:
        if batch.ndim != 2 or not len(batch):
            raise InputError(f"{what} of shape {batch.shape}; expected [tokens, d_model]")
        self._check_width(batch.shape[1], what)
        if not np.isfinite(batch).all():
            raise InputError(f"the {what} hold NaN or infinite values")
        return batch

    def _check_width(self, width: int, what: str = "activations") -> None:
        if width != self.d_model:
            raise InputError(f"{what} have width {width}; the Trainer's d_model is {self.d_model}")


def evaluate(
    saes: Sae | Sequence[Sae],
    activations: Activations,
    batch_size: int = 4096,
    targets: Activations | None = None,
) -> list[dict[str, Any]]:
    """The report's held-out metrics (L0, fraction of variance explained, normalised MSE,
    dead and dense latents) of each SAE on activation rows [tokens, d_model] (an array or an
    iterator of arrays): pass rows the SAEs were not trained on. Transcoders are judged on
    `targets` (row for row, in the same form). One dict per SAE."""
    saes = [saes] if isinstance(saes, Sae) else list(saes)
    if any(s.model.transcoder for s in saes) and targets is None:
        raise ConfigError("evaluating a transcoder needs its targets")
    batches: Iterable[Any] = _row_batches(activations, batch_size)
    if targets is not None:
        batches = zip(batches, _row_batches(targets, batch_size), strict=True)
    models = [evaluation.EvalModel(s.model, s.weights) for s in saes]
    results = evaluation.evaluate_rows(models, batches)
    return [result.metrics for result in results]


def _row_batches(rows: Activations, batch_size: int) -> Iterable[np.ndarray]:
    if isinstance(rows, np.ndarray | jax.Array):
        array = np.asarray(rows)
        return (array[i : i + batch_size] for i in range(0, len(array), batch_size))
    return rows
