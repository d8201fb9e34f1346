"""Typed, validated configuration: one dataclass per stage, from YAML plus key=value overrides.

The dataclass defaults are the tiny local run (configs/local.yaml spells them out). Validation
happens at load, before any work, and every problem is a one-line `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from sae import storage
from sae.errors import ConfigError


@dataclass
class DemoConfig:
    """Offline demo inputs: a generated corpus and a tiny Gemma trained on it."""

    enabled: bool = True
    num_documents: int = 4000
    num_files: int = 4
    seed: int = 0
    # Tiny language model (keras-hub GemmaBackbone) trained briefly on the demo corpus.
    vocabulary_size: int = 1024
    num_layers: int = 4
    hidden_dim: int = 128
    lm_train_steps: int = 150

    def validate(self) -> None:
        _positive(self, "num_documents", "num_files", "vocabulary_size", "num_layers")
        _positive(self, "hidden_dim", "lm_train_steps")


@dataclass
class ModelConfig:
    """The language model whose activations are read."""

    # keras-hub preset directory (local path or gs://). Empty: <workdir>/model (the demo model).
    preset: str = ""
    # Compute dtype of the forward pass; Gemma on TPU wants bfloat16.
    dtype: Literal["float32", "bfloat16"] = "float32"

    def validate(self) -> None:
        pass


@dataclass
class TokenizeConfig:
    """Corpus -> packed token sequences in Parquet shards (Apache Beam)."""

    # Corpus files: one URI or glob, or several separated by commas. Empty: the demo corpus.
    input: str = ""
    format: Literal["jsonl", "text"] = "jsonl"
    text_field: str = "text"
    sequence_length: int = 128
    num_shards: int = 4
    # Fraction of sequences held out for evaluation (the report stage reads only these).
    eval_fraction: float = 0.05
    # What to do with a record that is not valid UTF-8 or JSON: stop with an error, or skip it.
    on_bad_record: Literal["error", "skip"] = "error"
    runner: Literal["direct", "dataflow"] = "direct"
    seed: int = 0

    def validate(self) -> None:
        _positive(self, "num_shards")
        if self.sequence_length < 2:
            raise ConfigError("tokenize.sequence_length must be at least 2")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError("tokenize.eval_fraction must be in [0, 1)")


@dataclass
class TrainConfig:
    """Streaming extraction from the language model into a ReLU SAE."""

    layer: int = 2
    # Dictionary width as a multiple of the model's hidden size.
    expansion_factor: int = 8
    # On inputs scaled to mean norm sqrt(d_model); 2.0 gives L0 ~25 on the demo model.
    l1_coefficient: float = 2.0
    learning_rate: float = 2e-3
    # Tokens per optimizer step (split over the mesh's data axis).
    batch_size: int = 1024
    steps: int = 600
    # Sequences per language-model forward pass (split over the mesh's data axis).
    lm_batch_size: int = 16
    # Activation rows held for shuffling; bounds host memory whatever the corpus size.
    shuffle_buffer: int = 16384
    checkpoint_every: int = 200
    log_every: int = 25
    # A latent that has not fired for this many training tokens counts as dead (10M is the
    # field's default; the tiny local run sees fewer tokens than that in total).
    dead_window_tokens: int = 200_000
    # Mesh shape: data axis over tokens, model axis over latents; -1 takes the remaining devices.
    mesh_data: int = -1
    mesh_model: int = 1
    seed: int = 0

    def validate(self) -> None:
        if self.layer < 0:
            raise ConfigError(f"train.layer must be >= 0, got {self.layer}")
        _positive(self, "expansion_factor", "batch_size", "steps", "lm_batch_size")
        _positive(self, "shuffle_buffer", "checkpoint_every", "log_every", "mesh_model")
        _positive(self, "dead_window_tokens")
        _non_negative(self, "l1_coefficient", "learning_rate")
        if self.mesh_data != -1 and self.mesh_data < 1:
            raise ConfigError("train.mesh_data must be -1 (all devices) or positive")
        if self.shuffle_buffer < self.batch_size:
            raise ConfigError("train.shuffle_buffer must be at least train.batch_size")


@dataclass
class ReportConfig:
    """Evaluation on the held-out split, feature pages and steering vectors."""

    eval_tokens: int = 50_000
    top_contexts: int = 8
    context_window: int = 10
    # Features listed in the HTML report (most frequently active first); 0 lists every live one.
    max_features: int = 300
    # Features to export steering vectors for; empty picks the `num_steering` most active.
    steering_features: list[int] = field(default_factory=list)
    num_steering: int = 16

    def validate(self) -> None:
        _positive(self, "eval_tokens", "top_contexts", "num_steering")
        _non_negative(self, "context_window", "max_features")
        if any(i < 0 for i in self.steering_features):
            raise ConfigError("report.steering_features must be non-negative feature indices")


@dataclass
class PipelineConfig:
    """The whole run; each stage reads its own section and the paths derived from `workdir`."""

    workdir: str = "runs/local"
    demo: DemoConfig = field(default_factory=DemoConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def validate(self) -> None:
        if not self.workdir:
            raise ConfigError("workdir must not be empty")
        for section in (self.demo, self.model, self.tokenize, self.train, self.report):
            section.validate()
        if not self.demo.enabled and not self.tokenize.input:
            raise ConfigError("tokenize.input is required when demo.enabled is false")
        if not self.demo.enabled and not self.model.preset:
            raise ConfigError("model.preset is required when demo.enabled is false")

    # Derived locations: every stage agrees on them, so stages can be run one by one.
    @property
    def corpus_uri(self) -> str:
        return self.tokenize.input or storage.join(self.workdir, "corpus", "*.jsonl")

    @property
    def demo_corpus_dir(self) -> str:
        return storage.join(self.workdir, "corpus")

    @property
    def preset_uri(self) -> str:
        return self.model.preset or storage.join(self.workdir, "model")

    @property
    def tokens_uri(self) -> str:
        return storage.join(self.workdir, "tokens")

    @property
    def sae_uri(self) -> str:
        return storage.join(self.workdir, "sae")

    @property
    def report_uri(self) -> str:
        return storage.join(self.workdir, "report")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-data form of a config dataclass (for manifests and fingerprints)."""
    return dataclasses.asdict(config)


def load(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML config (or the defaults), apply `a.b=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path:
        if not storage.exists(path):
            raise ConfigError(f"config file not found: {path}")
        text = storage.read_text(path)
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            problem = _first_line(error)
            raise ConfigError(f"config file {path} is not valid YAML: {problem}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    for override in overrides:
        _apply_override(raw, override)
    config = from_dict(PipelineConfig, raw)
    config.validate()
    return config


def from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from `raw`, rejecting unknown keys and wrongly typed values."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}'{_suggestion(key, names, prefix)}")
        values[key] = _coerce(hints[key], value, dotted)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return from_dict(hint, value, prefix=f"{key}.")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(f"config key '{key}' must be one of {choices}, got {value!r}")
        return value
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1]
        if value is None:
            return []
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"config key '{key}' has an unsupported type")  # not used by any config
    return _coerce_scalar(hint, value, key)


def _coerce_scalar(hint: type, value: Any, key: str) -> Any:
    # bool is a subclass of int in Python: reject it where a number is expected.
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "2e-3" (no dot) as a string; it is still plainly a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    raise ConfigError(f"config key '{key}' has an unsupported type {hint!r}")


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like key=value (e.g. train.steps=100)")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _suggestion(key: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _positive(section: Any, *names: str) -> None:
    for name in names:
        if getattr(section, name) <= 0:
            raise ConfigError(f"{_section_name(section)}.{name} must be positive")


def _non_negative(section: Any, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 0:
            raise ConfigError(f"{_section_name(section)}.{name} must not be negative")


def _section_name(section: Any) -> str:
    return type(section).__name__.removesuffix("Config").lower()


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]
