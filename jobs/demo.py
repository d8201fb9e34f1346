"""The demo stage: writes the generated corpus and trains the tiny Gemma preset, offline."""

from __future__ import annotations

import dataclasses

from sae.config import PipelineConfig
from sae.errors import ConfigError
from sae.io import manifest
from sae.io.stages import StageOutput, run_stage
from sae.progress import log


def tiny_model_spec(config: PipelineConfig):
    from sae.demo.tiny_model import TinyModelSpec

    demo = config.demo
    heads = 4
    return TinyModelSpec(
        vocabulary_size=demo.vocabulary_size,
        num_layers=demo.num_layers,
        hidden_dim=demo.hidden_dim,
        intermediate_dim=4 * demo.hidden_dim,
        num_query_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=max(demo.hidden_dim // heads, 8),
        train_steps=demo.lm_train_steps,
        seed=demo.seed,
    )


def run(config: PipelineConfig, force: bool = False) -> None:
    if not config.demo.enabled:
        raise ConfigError("the demo stage needs demo.enabled: true")
    demo = config.demo
    corpus_config = {k: getattr(demo, k) for k in ("num_documents", "num_files", "seed")}

    def write_corpus() -> StageOutput:
        from sae.demo.corpus import write_demo_corpus

        uris = write_demo_corpus(
            config.demo_corpus_dir, demo.num_documents, demo.num_files, demo.seed
        )
        return StageOutput({"documents": demo.num_documents, "files": len(uris)}, uris)

    run_stage("demo-corpus", config.demo_corpus_dir, corpus_config, {}, write_corpus, force)

    spec = tiny_model_spec(config)
    inputs = {"corpus": manifest.fingerprint(config.demo_corpus_dir)}

    def train_model() -> StageOutput:
        from sae.demo.corpus import generate_documents
        from sae.demo.tiny_model import make_tiny_preset

        texts = list(generate_documents(demo.num_documents, demo.seed))
        log(
            "demo-model",
            f"training a tiny Gemma ({demo.num_layers} layers, hidden "
            f"{demo.hidden_dim}) on {len(texts)} demo documents",
        )
        stats = make_tiny_preset(texts, config.preset_uri, spec)
        counts = {k: v for k, v in stats.items() if isinstance(v, int | float)}
        return StageOutput(counts, [config.preset_uri], {"training": stats})

    run_stage("demo-model", config.preset_uri, dataclasses.asdict(spec), inputs, train_model, force)
