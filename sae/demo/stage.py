"""The demo stage: writes the generated corpus and trains the tiny Gemma preset, offline (two
stages with their own manifests: `demo-corpus` in <workdir>/corpus, `demo-model` in the preset)."""

from __future__ import annotations

import dataclasses

from sae.config import PipelineConfig
from sae.demo.corpus import (
    concepts,
    generate_documents,
    write_demo_corpus,
    write_labelled_documents,
)
from sae.demo.tiny_model import TinyModelSpec, make_tiny_preset
from sae.errors import ConfigError
from sae.io import manifest, storage
from sae.io.stages import StageOutput, run_stage
from sae.progress import log


def tiny_model_spec(config: PipelineConfig) -> TinyModelSpec:
    cfg = config.demo
    heads = 4
    return TinyModelSpec(
        family=cfg.model_family,
        vocabulary_size=cfg.vocabulary_size,
        num_layers=cfg.num_layers,
        hidden_dim=cfg.hidden_dim,
        intermediate_dim=4 * cfg.hidden_dim,
        num_query_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=max(cfg.hidden_dim // heads, 8),
        train_steps=cfg.lm_train_steps,
        seed=cfg.seed,
    )


def demo(config: PipelineConfig, force: bool = False) -> bool:
    """Write the demo corpus and train the tiny model on it; returns whether either ran
    (False when both manifests already match the config)."""
    cfg = config.demo
    if not cfg.enabled:
        raise ConfigError("the demo stage needs demo.enabled: true")
    corpus_config = {k: getattr(cfg, k) for k in ("num_documents", "num_files", "seed")}

    def write_corpus() -> StageOutput:
        uris = write_demo_corpus(config.demo_corpus_dir, cfg.num_documents, cfg.num_files, cfg.seed)
        return StageOutput({"documents": cfg.num_documents, "files": len(uris)}, uris)

    wrote_corpus = run_stage(
        "demo-corpus", config.demo_corpus_dir, corpus_config, {}, write_corpus, force
    )
    probing_documents = config.report.probing.max_documents
    labels_config = {"probing_documents": probing_documents, "seed": cfg.seed}

    def write_labels() -> StageOutput:
        # Genre-labelled documents for sparse probing, none of them in the corpus, and the
        # corpus's word lists as token-level concepts for the absorption evaluation.
        corpus = set(generate_documents(cfg.num_documents, cfg.seed))
        labelled = write_labelled_documents(
            config.demo_probing_uri, probing_documents, cfg.seed + 1, corpus
        )
        storage.write_json(config.demo_concepts_uri, concepts())
        outputs = [config.demo_probing_uri, config.demo_concepts_uri]
        return StageOutput({"probing_documents": labelled}, outputs)

    wrote_labels = run_stage(
        "demo-labels",
        config.demo_labels_dir,
        labels_config,
        {"corpus": manifest.fingerprint(config.demo_corpus_dir)},
        write_labels,
        force,
    )
    spec = tiny_model_spec(config)
    inputs = {"corpus": manifest.fingerprint(config.demo_corpus_dir)}

    def train_model() -> StageOutput:
        texts = list(generate_documents(cfg.num_documents, cfg.seed))
        log(
            "demo-model",
            f"training a tiny Gemma ({cfg.num_layers} layers, hidden "
            f"{cfg.hidden_dim}) on {len(texts)} demo documents",
        )
        stats = make_tiny_preset(texts, config.preset_uri, spec)
        counts = {k: v for k, v in stats.items() if isinstance(v, int | float)}
        return StageOutput(counts, [config.preset_uri], {"training": stats})

    trained = run_stage(
        "demo-model", config.preset_uri, dataclasses.asdict(spec), inputs, train_model, force
    )
    return wrote_corpus or wrote_labels or trained
