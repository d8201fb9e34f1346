"""The report stage: held-out evaluation, an HTML feature page, features JSON, steering vectors."""

from __future__ import annotations

import dataclasses

import sentencepiece as spm

from jobs.common import StageOutput, log, require_manifest, run_stage
from sae import evaluation, features, lm, manifest, report_html, sae_io, sharding, steering, storage
from sae.config import PipelineConfig
from sae.errors import InputError
from sae.progress import Progress
from sae.token_shards import iter_sequences


def run(config: PipelineConfig, force: bool = False) -> None:
    cfg = config.report
    tokens_manifest = require_manifest(config.tokens_uri, "tokenize")
    require_manifest(config.sae_uri, "train")
    eval_shards = tokens_manifest["shards"]["eval"]
    if not eval_shards:
        raise InputError(
            f"no held-out split in {config.tokens_uri}: set "
            "tokenize.eval_fraction above 0 and re-run tokenize"
        )
    inputs = {
        "tokens": manifest.fingerprint(config.tokens_uri),
        "sae": manifest.fingerprint(config.sae_uri),
    }

    def body() -> StageOutput:
        return _report(config, tokens_manifest, eval_shards)

    run_stage("report", config.report_uri, dataclasses.asdict(cfg), inputs, body, force)


def _report(config: PipelineConfig, tokens_manifest: dict, eval_shards: list[str]) -> StageOutput:
    cfg, output = config.report, config.report_uri
    sae, params, sae_cfg = sae_io.load(config.sae_uri)
    preset = sae_cfg["model_preset"]
    lm.check_layers(preset, [sae_cfg["layer"]])
    hidden = int(lm.backbone_config(preset)["hidden_dim"])
    if hidden != sae_cfg["d_in"]:
        raise InputError(
            f"the SAE at {config.sae_uri} reads d_model={sae_cfg['d_in']} but the "
            f"model at {preset} has hidden size {hidden}"
        )
    out_of_range = [i for i in cfg.steering_features if i >= sae.d_sae]
    if out_of_range:
        raise InputError(
            f"report.steering_features: feature {out_of_range[0]} is out of range "
            f"(the SAE has {sae.d_sae} features)"
        )
    mesh = sharding.make_mesh(config.train.mesh_data, 1)
    tap = lm.ActivationTap(lm.load_backbone(preset, config.model.dtype), [sae_cfg["layer"]], mesh)
    tokenizer = tokens_manifest["tokenizer"]
    progress = Progress("report", cfg.eval_tokens)
    result = evaluation.evaluate(
        sae,
        params,
        iter_sequences(eval_shards),
        tap,
        config.train.lm_batch_size,
        tokenizer["bos_id"],
        cfg.eval_tokens,
        cfg.top_contexts,
        progress,
    )
    progress.close()
    metrics = {"split": "eval (held out by tokenize; never trained on)", **result.metrics}
    log(
        "report",
        "held-out: "
        + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if isinstance(v, float)),
    )

    processor = spm.SentencePieceProcessor(model_proto=lm.tokenizer_proto(preset))
    shown = features.most_active(result, cfg.max_features)
    summaries = features.feature_summaries(result, processor, cfg.context_window, shown)
    run_info = {
        "model": preset,
        "layer": sae_cfg["hook_name"],
        "sae": config.sae_uri,
        "d_in": sae_cfg["d_in"],
        "d_sae": sae_cfg["d_sae"],
        "training_tokens": sae_cfg["training_tokens"],
    }

    chosen = cfg.steering_features or features.most_active(
        result, cfg.num_steering, exclude_dense=True
    )
    vectors, strengths = steering.steering_vectors(params["W_dec"], result, chosen)
    metadata = {
        "model_preset": preset,
        "layer": sae_cfg["layer"],
        "hook_name": sae_cfg["hook_name"],
        "sae": config.sae_uri,
    }

    files = {
        "metrics": storage.join(output, "metrics.json"),
        "features": storage.join(output, "features.json"),
        "html": storage.join(output, "index.html"),
        "steering": storage.join(output, "steering", "vectors.safetensors"),
        "steering_index": storage.join(output, "steering", "vectors.json"),
    }
    storage.write_json(files["metrics"], metrics)
    storage.write_json(files["features"], {"run": run_info, "features": summaries})
    storage.write_text(
        files["html"],
        report_html.render(f"SAE report: {sae_cfg['hook_name']}", metrics, run_info, summaries),
    )
    steering.save(files["steering"], vectors, strengths, chosen, metadata)
    storage.write_json(
        files["steering_index"],
        {
            **metadata,
            "vectors": [
                {"feature": f, "suggested_strength": float(s)}
                for f, s in zip(chosen, strengths, strict=True)
            ],
        },
    )
    return StageOutput(result.metrics, list(files.values()))
