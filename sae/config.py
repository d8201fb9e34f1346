"""Typed, validated configuration: one dataclass per stage, from YAML plus key=value overrides.

The dataclass defaults are the tiny local run (configs/local.yaml spells them out). Validation
happens at load, before any work, and every problem is a one-line `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from sae.arch.spec import SaeSpec, Site
from sae.errors import ConfigError
from sae.io import model_sources, storage


@dataclass
class DemoConfig:
    """Offline demo inputs: a generated corpus and a tiny Gemma trained on it."""

    enabled: bool = True
    num_documents: int = 4000
    num_files: int = 4
    seed: int = 0
    # Tiny language model trained briefly on the demo corpus: gemma is keras-hub's
    # GemmaBackbone with Gemma 2 settings, gemma3 a text-only Gemma3Backbone (every sixth
    # layer global, the others sliding-window).
    model_family: Literal["gemma", "gemma3"] = "gemma"
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

    # A keras-hub preset directory (local or gs://), a keras-hub preset name, kaggle:// or hf://
    # handle, a local Hugging Face directory, or a .gguf file (the last three converted once
    # into a cached keras-hub preset). Empty: <workdir>/model (the demo model).
    preset: str = ""
    # Compute dtype of the forward pass; Gemma on TPU wants bfloat16.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Devices each weight of the model is split over (tensor parallelism), for a model larger
    # than one chip (Gemma 2 9B and up on a 16 GB v5e): the stages that run it (extract,
    # report, and streaming train, whose train.mesh_model must then equal it) put it on a
    # (devices / mesh_model) x mesh_model mesh. 1 replicates it on every device.
    mesh_model: int = 1

    def validate(self) -> None:
        _positive(self, "mesh_model")


@dataclass
class DataflowConfig:
    """Dataflow settings for `tokenize.runner=dataflow`; empty strings leave Beam's defaults."""

    project: str = ""
    region: str = ""
    # gs:// scratch space for the job; staging (the job's packages) defaults to it.
    temp_location: str = ""
    staging_location: str = ""
    # Workers need the `sae` package: a worker image (Dockerfile target `dataflow`), or
    # setup_file (./pyproject.toml) plus requirements_file installed at worker start.
    sdk_container_image: str = ""
    requirements_file: str = ""
    setup_file: str = ""
    machine_type: str = ""
    # Autoscaling limit; 0: Dataflow's default.
    max_num_workers: int = 0
    service_account_email: str = ""
    network: str = ""
    subnetwork: str = ""
    # Workers without external IPs (the subnetwork then needs Private Google Access).
    no_use_public_ips: bool = False

    def validate(self) -> None:
        for key in ("project", "region", "temp_location"):
            if not getattr(self, key):
                raise ConfigError(
                    f"tokenize.dataflow.{key} is required when tokenize.runner is dataflow"
                )
        for key in ("temp_location", "staging_location"):
            value = getattr(self, key)
            if value and not storage.is_gcs(value):
                raise ConfigError(f"tokenize.dataflow.{key} must be a gs:// URI, got {value!r}")
        if self.max_num_workers < 0:
            raise ConfigError("tokenize.dataflow.max_num_workers must not be negative")


@dataclass
class TokenizeConfig:
    """Corpus -> packed token sequences in Parquet shards (Apache Beam)."""

    # Corpus files: one URI or glob, or several separated by commas. Empty: the demo corpus.
    input: str = ""
    format: Literal["jsonl", "text", "parquet"] = "jsonl"
    # The JSONL field or Parquet column holding each document's text.
    text_field: str = "text"
    # Empty: the model preset's tokenizer. Otherwise a SentencePiece model file (.model, .spm)
    # or a keras-hub preset directory; its ids must fit the model's vocabulary.
    tokenizer: str = ""
    # Append the tokenizer's EOS after each document (BOS always comes before it).
    add_eos: bool = False
    # pack: documents concatenated and cut into full sequences; document: one document per
    # sequence, truncated to sequence_length and padded.
    packing: Literal["pack", "document"] = "pack"
    sequence_length: int = 128
    num_shards: int = 4
    # Fraction of sequences held out for evaluation (the report stage reads only these).
    eval_fraction: float = 0.05
    # What to do with a record that is not valid UTF-8 or JSON, or a null or non-string
    # Parquet value: stop with an error, or count and skip it.
    on_bad_record: Literal["error", "skip"] = "error"
    runner: Literal["direct", "dataflow"] = "direct"
    dataflow: DataflowConfig = field(default_factory=DataflowConfig)
    seed: int = 0

    def validate(self) -> None:
        _positive(self, "num_shards")
        if self.sequence_length < 2:
            raise ConfigError("tokenize.sequence_length must be at least 2")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError("tokenize.eval_fraction must be in [0, 1)")
        if self.runner == "dataflow":
            self.dataflow.validate()


def _default_saes() -> list[SaeSpec]:
    return [
        SaeSpec(architecture="relu", sparsity_coefficient=2.0),
        SaeSpec(architecture="topk", k=32),
    ]


@dataclass
class TrainConfig:
    """Activations (streamed from the language model, or from .npy files) into SAEs."""

    saes: list[SaeSpec] = field(default_factory=_default_saes)
    # Where activation rows come from: the language model over the tokenized corpus
    # (stream), the extract stage's activation store (store), or plain .npy files of shape
    # [tokens, d_model] (npy).
    source: Literal["stream", "store", "npy"] = "stream"
    # npy: the .npy files (a URI or glob, or several separated by commas); store: the store's
    # URI (empty: <workdir>/activations).
    activations: str = ""
    # Tokens per optimizer step (split over the mesh's data axis).
    batch_size: int = 1024
    steps: int = 600
    # Sequences per language-model forward pass on each host (split over that host's devices
    # on the mesh's data axis).
    lm_batch_size: int = 16
    # Activation rows held for shuffling; bounds host memory whatever the corpus size.
    shuffle_buffer: int = 16384
    checkpoint_every: int = 200
    # SAELens' n_checkpoints: this many snapshots of every SAE, evenly spaced through training
    # (every ceil(steps / (n + 1)) steps), each kept in SAELens' format at
    # sae/<name>/checkpoints/<training tokens>/ (the resume checkpoints keep only the last two).
    # The report evaluates them as a curve over training tokens.
    n_checkpoints: int = 0
    log_every: int = 25
    # A latent that has not fired for this many training tokens counts as dead (10M is the
    # field's default; the tiny local run sees fewer tokens than that in total).
    dead_window_tokens: int = 200_000
    # A step whose batch, loss or gradients hold a NaN or infinity leaves the SAE unchanged
    # and is counted (metrics: skipped_steps); more consecutive such steps than this stop the
    # run with a one-line error (0: the first one does).
    max_skipped_steps: int = 20
    # Adam schedule: linear warm-up, constant, then decay over the last fraction of the steps.
    lr_warmup_steps: int = 20
    lr_decay_fraction: float = 0.2
    lr_decay_shape: Literal["linear", "cosine"] = "linear"
    lr_final_fraction: float = 0.0
    # Global-norm gradient clipping; 0 turns it off.
    grad_clip_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    # Linear warm-up of the sparsity coefficient (ReLU's L1, JumpReLU's L0) over these steps.
    sparsity_warmup_steps: int = 0
    decoder_bias_init: Literal["mean", "geometric_median", "zeros"] = "geometric_median"
    # Encoder and decoder matmuls; parameters and optimizer state stay float32.
    matmul_dtype: Literal["float32", "bfloat16"] = "float32"
    # Mesh shape: data axis over tokens, model axis over latents; -1 takes the remaining devices.
    mesh_data: int = -1
    mesh_model: int = 1
    seed: int = 0
    # Warm start: a finished train output (a run's sae/ directory) whose last checkpoint gives
    # the SAEs' starting weights and input scale; the SAEs must have the same names, shapes
    # and layers. The optimizer state and learning-rate schedule start afresh. Empty: a cold
    # start. `gemma-sae retrain` sets it to the latest good run's SAEs.
    init_from: str = ""

    def validate(self) -> None:
        if not self.saes:
            raise ConfigError("train.saes must list at least one SAE")
        for index, sae in enumerate(self.saes):
            sae.validate(f"train.saes[{index}]")
        names = [sae.display_name() for sae in self.saes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"train.saes: two SAEs share the name {duplicates[0]!r}; name them")
        _positive(self, "batch_size", "steps", "lm_batch_size")
        _positive(self, "shuffle_buffer", "checkpoint_every", "log_every", "mesh_model")
        _positive(self, "dead_window_tokens")
        _non_negative(self, "lr_warmup_steps", "grad_clip_norm")
        _non_negative(self, "sparsity_warmup_steps", "lr_final_fraction", "max_skipped_steps")
        _non_negative(self, "n_checkpoints")
        if self.n_checkpoints >= self.steps:
            raise ConfigError(
                f"train.n_checkpoints ({self.n_checkpoints}) must be below train.steps "
                f"({self.steps})"
            )
        if not 0 <= self.lr_decay_fraction <= 1:
            raise ConfigError("train.lr_decay_fraction must be in [0, 1]")
        if self.lr_warmup_steps + self.lr_decay_steps > self.steps:
            raise ConfigError(
                f"train.lr_warmup_steps ({self.lr_warmup_steps}) and the decay "
                f"({self.lr_decay_steps} steps) do not fit in train.steps ({self.steps})"
            )
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be in [0, 1)")
        if self.lr_final_fraction > 1:
            raise ConfigError("train.lr_final_fraction must be in [0, 1]")
        if self.mesh_data != -1 and self.mesh_data < 1:
            raise ConfigError("train.mesh_data must be -1 (all devices) or positive")
        if self.shuffle_buffer < self.batch_size:
            raise ConfigError("train.shuffle_buffer must be at least train.batch_size")
        if self.source == "npy" and not self.activations:
            raise ConfigError("train.activations (.npy files) is required when train.source is npy")
        if self.source == "stream" and self.activations:
            raise ConfigError("train.activations is not read when train.source is stream")

    @property
    def lr_decay_steps(self) -> int:
        return round(self.steps * self.lr_decay_fraction)

    @property
    def snapshot_steps(self) -> list[int]:
        """The steps of the n_checkpoints snapshots, spaced as SAELens spaces them."""
        if not self.n_checkpoints:
            return []
        every = -(-self.steps // (self.n_checkpoints + 1))
        return list(range(every, self.steps, every))[: self.n_checkpoints]

    @property
    def layers(self) -> list[int]:
        """The distinct layers the SAEs read, in order."""
        return sorted({sae.layer for sae in self.saes})

    @property
    def sites(self) -> list[Site]:
        """The distinct sites the SAEs read and transcoders predict, in the model's order:
        the columns of an activation row, d_model each."""
        found = {sae.input_site for sae in self.saes}
        found |= {sae.target_site for sae in self.saes if sae.target_site is not None}
        return sorted(found)


@dataclass
class ExtractConfig:
    """The train split's activations, computed once into a store that many runs can read."""

    # Residual-stream layers to store; empty: the sites the train section's SAEs read (the
    # MLP inputs and outputs of its transcoders included).
    layers: list[int] = field(default_factory=list)
    # Sequences per language-model forward pass on each host (split over that host's devices
    # on the mesh's data axis).
    lm_batch_size: int = 16
    # Rows per stored chunk: the unit of reading, and of shuffling at chunk level.
    chunk_rows: int = 4096
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    # Stop after this many rows (0: the whole train split).
    max_rows: int = 0
    mesh_data: int = -1

    def validate(self) -> None:
        _positive(self, "lm_batch_size", "chunk_rows")
        _non_negative(self, "max_rows")
        if any(layer < 0 for layer in self.layers):
            raise ConfigError("extract.layers must be non-negative layer indices")
        if self.mesh_data != -1 and self.mesh_data < 1:
            raise ConfigError("extract.mesh_data must be -1 (all devices) or positive")


@dataclass
class ProbingConfig:
    """Sparse probing (SAEBench's): labelled documents, each SAE's latents mean-pooled per
    document, the k latents whose class means differ most, a logistic probe on them."""

    # A JSONL or Parquet file of labelled documents; empty: the demo's genre-labelled
    # documents when demo.enabled (written apart from the training corpus), else no probing.
    data: str = ""
    text_field: str = "text"
    label_field: str = "label"
    # 0 switches sparse probing off.
    max_documents: int = 1000
    k_values: list[int] = field(default_factory=lambda: [1, 2, 5, 20])
    # Documents held out from fitting each probe, on which its accuracy is reported.
    test_fraction: float = 0.2
    # A class needs this many documents to become a task (class against the rest, balanced).
    min_class_documents: int = 20
    seed: int = 0

    def validate(self) -> None:
        _non_negative(self, "max_documents")
        _positive(self, "min_class_documents")
        if not self.k_values or any(k < 1 for k in self.k_values):
            raise ConfigError("report.probing.k_values must be positive latent counts")
        if not 0 < self.test_fraction < 1:
            raise ConfigError("report.probing.test_fraction must be between 0 and 1")


@dataclass
class ConceptConfig:
    """A token-level concept: a name and its words (report.absorption.concepts)."""

    name: str = ""
    words: list[str] = field(default_factory=list)


@dataclass
class AbsorptionConfig:
    """Feature absorption and splitting on token-level concepts (sae.analysis.absorption)."""

    # Empty: the demo's concepts (weekdays, colours, number words, names) when demo.enabled,
    # else none (the evaluation is skipped).
    concepts: list[ConceptConfig] = field(default_factory=list)
    # The first held-out sequences of the evaluation's model pass read for it (the pass goes
    # on past report.eval_tokens until it has them); 0 switches the evaluation off.
    sequences: int = 256
    # A latent is precise for a concept when at least this share of its firings are on it.
    precise: float = 0.9

    def validate(self) -> None:
        _non_negative(self, "sequences")
        if not 0 < self.precise <= 1:
            raise ConfigError("report.absorption.precise must be in (0, 1]")
        for concept in self.concepts:
            if not concept.name or not concept.words:
                raise ConfigError("report.absorption.concepts: each needs a name and words")


@dataclass
class AutoInterpConfig:
    """Auto-interpretability, delphi-style (sae.analysis.autointerp): an explainer model
    explains each feature from its top and quantile-sampled contexts, then is scored on
    telling held-out activating contexts from non-activating ones given the explanation."""

    # Features explained per SAE, the most frequently active first; 0 switches it off.
    features: int = 4
    # An OpenAI-compatible chat endpoint (its base URL, e.g. http://host:8000/v1 for vLLM);
    # empty: an in-process keras-hub Gemma (`explainer`).
    endpoint: str = ""
    endpoint_model: str = ""
    # The environment variable holding the endpoint's API key (read, never logged); unset or
    # empty sends no key.
    api_key_env: str = "OPENAI_API_KEY"
    timeout_seconds: float = 120.0
    # The in-process explainer: any model source model.preset accepts, best an instruction-
    # tuned Gemma (gemma2_instruct_2b_en, ...); empty: the run's own model (a poor explainer,
    # fine for checking the machinery).
    explainer: str = ""
    # Top contexts and quantile-sampled contexts shown to the explainer.
    explain_top: int = 8
    explain_quantile: int = 4
    # Held-out activating contexts (quantile-sampled, none shown to the explainer) scored,
    # with as many non-activating ones.
    detection_examples: int = 8
    # "probability": one excerpt per prompt, the explainer's probability of answering 1
    # rather than 0 (delphi's log-prob detection; an AUROC too; an endpoint must return
    # logprobs); "list": `examples_per_prompt` excerpts per prompt, the 0/1 list it writes.
    detection: Literal["probability", "list"] = "probability"
    examples_per_prompt: int = 4
    max_new_tokens: int = 48
    # Prompts generated together by the in-process explainer.
    batch_size: int = 8
    seed: int = 0

    def validate(self) -> None:
        _non_negative(self, "features", "explain_quantile")
        _positive(self, "explain_top", "detection_examples", "examples_per_prompt")
        _positive(self, "max_new_tokens", "batch_size")
        if not (math.isfinite(self.timeout_seconds) and self.timeout_seconds > 0):
            raise ConfigError("report.autointerp.timeout_seconds must be a positive number")
        if self.endpoint and not self.endpoint_model:
            raise ConfigError("report.autointerp.endpoint needs report.autointerp.endpoint_model")
        if self.endpoint and not self.endpoint.startswith(("http://", "https://")):
            raise ConfigError(
                f"report.autointerp.endpoint must be an http(s) URL, not {self.endpoint!r}"
            )


@dataclass
class ReportConfig:
    """Evaluation on the held-out split, feature pages and steering vectors."""

    eval_tokens: int = 50_000
    top_contexts: int = 8
    context_window: int = 10
    # Give every context token in features.json the feature's activation there (a second
    # model pass over the held-out sequences the shown contexts come from); else only the
    # firing token's.
    context_values: bool = True
    # Features listed in the HTML report (most frequently active first); 0 lists every live one.
    max_features: int = 300
    # Features to export steering vectors for; empty picks the `num_steering` most active
    # (0: every live feature).
    steering_features: list[int] = field(default_factory=list)
    num_steering: int = 16
    # Held-out sequences for the spliced metrics (CE loss recovered, delta LM loss, KL): the
    # model re-run with each SAE's reconstruction in place of its layer's output (and with it
    # zero-ablated). Costs about (2 + SAEs per layer) forward passes per sequence; 0 skips them.
    spliced_sequences: int = 64
    # Training-split tokens whose mean activation gives the spliced metrics a mean-ablation
    # baseline (CE recovered against the mean, not only against zeros); 0 skips it.
    mean_ablation_tokens: int = 20_000
    # Held-out sequences on which the snapshots of train.n_checkpoints and the final SAEs are
    # spliced for the curve over training tokens (report/curve.json); 0 leaves the spliced
    # metrics out of the curve. Costs about (2 + snapshots + SAEs) forwards per sequence.
    curve_sequences: int = 32
    # Steering evaluation (sae.analysis.steering_eval) of the first N steering vectors of each
    # residual-stream SAE: concept against cost for the feature's direction, DiffMean and a
    # random direction, at these multiples of each feature's suggested strength, on these
    # prompts, the cost over `steering_eval_sequences` held-out sequences; 0 features skips it.
    steering_eval_features: int = 2
    steering_eval_scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    steering_eval_prompts: list[str] = field(
        default_factory=lambda: ["The", "In the morning, she", "My favourite thing about it is"]
    )
    steering_eval_new_tokens: int = 24
    steering_eval_sequences: int = 16
    steering_eval_max_ce_increase: float = 0.5
    probing: ProbingConfig = field(default_factory=ProbingConfig)
    absorption: AbsorptionConfig = field(default_factory=AbsorptionConfig)
    autointerp: AutoInterpConfig = field(default_factory=AutoInterpConfig)

    def validate(self) -> None:
        self.probing.validate()
        self.absorption.validate()
        self.autointerp.validate()
        if self.autointerp.features and not self.context_values:
            raise ConfigError(
                "report.autointerp needs report.context_values (its non-activating contexts "
                "and marked tokens come from that pass)"
            )
        if self.autointerp.features > self.max_features > 0:
            raise ConfigError("report.autointerp.features must not exceed report.max_features")
        _positive(self, "eval_tokens", "top_contexts")
        _non_negative(self, "context_window", "max_features", "num_steering", "spliced_sequences")
        _non_negative(self, "mean_ablation_tokens", "curve_sequences", "steering_eval_features")
        if self.steering_eval_features:
            _positive(self, "steering_eval_new_tokens", "steering_eval_sequences")
            if not self.steering_eval_prompts or not self.steering_eval_scales:
                raise ConfigError(
                    "report.steering_eval_prompts and report.steering_eval_scales must not be "
                    "empty when report.steering_eval_features is set"
                )
            if not all(math.isfinite(s) and s > 0 for s in self.steering_eval_scales):
                raise ConfigError("report.steering_eval_scales must be positive numbers")
        if any(i < 0 for i in self.steering_features):
            raise ConfigError("report.steering_features must be non-negative feature indices")


@dataclass
class PipelineConfig:
    """The whole run; each stage reads its own section and the paths derived from `workdir`."""

    workdir: str = "runs/local"
    demo: DemoConfig = field(default_factory=DemoConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def validate(self) -> None:
        if not self.workdir:
            raise ConfigError("workdir must not be empty")
        sections = (self.demo, self.model, self.tokenize, self.extract, self.train, self.report)
        for section in sections:
            section.validate()
        if self.tokenize.runner == "dataflow":
            self._check_dataflow_paths()

    def require(self, key: str) -> None:
        """A stage that reads the corpus (`tokenize.input`) or the model (`model.preset`)
        calls this first: without the demo, they must be named. Checked per stage, not at
        load, so that training from .npy files or a store needs neither."""
        section, name = key.split(".")
        if not self.demo.enabled and not getattr(getattr(self, section), name):
            raise ConfigError(f"{key} is required when demo.enabled is false")

    def _check_dataflow_paths(self) -> None:
        # Dataflow workers can neither read nor write this machine's disk.
        if not storage.is_gcs(self.tokens_uri):
            raise ConfigError("workdir must be a gs:// URI when tokenize.runner is dataflow")
        inputs = [u.strip() for u in self.corpus_uri.split(",") if u.strip()]
        local = [u for u in inputs if not storage.is_gcs(u)]
        if local:
            raise ConfigError(
                "tokenize.input must be gs:// URIs when tokenize.runner is dataflow, "
                f"got {local[0]!r}"
            )

    # Derived locations: every stage agrees on them, so stages can be run one by one.
    @property
    def corpus_uri(self) -> str:
        return self.tokenize.input or storage.join(self.workdir, "corpus", "*.jsonl")

    @property
    def demo_corpus_dir(self) -> str:
        return storage.join(self.workdir, "corpus")

    @property
    def demo_labels_dir(self) -> str:
        """The demo's labels for the report (its own stage output, beside the corpus: inside
        it, a tokenize.input naming the corpus folder would read them as text)."""
        return storage.join(self.workdir, "labels")

    @property
    def demo_probing_uri(self) -> str:
        """The demo's genre-labelled documents for sparse probing."""
        return storage.join(self.demo_labels_dir, "genres.jsonl")

    @property
    def demo_concepts_uri(self) -> str:
        """The demo's token-level concepts (word lists) for the absorption evaluation."""
        return storage.join(self.demo_labels_dir, "concepts.json")

    @property
    def probing_uri(self) -> str:
        """report.probing.data, or the demo's labelled documents; empty: no probing (also
        with report.probing.max_documents 0)."""
        if not self.report.probing.max_documents:
            return ""
        data = self.report.probing.data
        return data or (self.demo_probing_uri if self.demo.enabled else "")

    @property
    def preset_uri(self) -> str:
        """The keras-hub preset directory of the model: model.preset, converted once when it
        is a .gguf file, a Hugging Face directory or a hub handle (sae.io.model_sources)."""
        if not self.model.preset:
            return storage.join(self.workdir, "model")
        return model_sources.resolve(self.model.preset)

    @property
    def tokens_uri(self) -> str:
        return storage.join(self.workdir, "tokens")

    @property
    def activations_uri(self) -> str:
        """The activation store the extract stage writes (and train.source=store reads)."""
        if self.train.source == "store" and self.train.activations:
            return self.train.activations
        return storage.join(self.workdir, "activations")

    @property
    def extract_sites(self) -> list[Site]:
        if self.extract.layers:
            return [Site(layer) for layer in sorted(set(self.extract.layers))]
        return self.train.sites

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
    # Start from the defaults so an override can reach into a default list
    # (train.saes.1.k=16); the file's sections merge in, its lists replace.
    raw = _merge(dataclasses.asdict(PipelineConfig()), raw)
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


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like key=value (e.g. train.steps=100)")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    node: Any = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list):
            node = _list_item(node, part, override)
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, dict | list):
            raise ConfigError(f"override {override!r}: '{part}' is not a section")
        node = child
    if isinstance(node, list):
        index = _list_index(node, parts[-1], override)
        node[index] = value
    else:
        node[parts[-1]] = value


def _list_index(items: list, part: str, override: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(
            f"override {override!r}: '{part}' is not an index of a list of {len(items)} items"
        )
    return int(part)


def _list_item(items: list, part: str, override: str) -> dict[str, Any]:
    item = items[_list_index(items, part, override)]
    if not isinstance(item, dict):
        raise ConfigError(f"override {override!r}: item {part} is not a section")
    return item


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
