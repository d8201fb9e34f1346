"""The report stage: held-out evaluation, feature dashboards, features JSON, steering vectors."""

from __future__ import annotations

import dataclasses
import functools
import random
from typing import Any

import numpy as np
import sentencepiece as spm
from jax.sharding import Mesh

from sae import sharding
from sae.analysis import (
    absorption,
    autointerp,
    context_values,
    evaluation,
    feature_report,
    features,
    logit_effects,
    plots,
    probing,
    report_html,
    steering,
    steering_eval,
    token_curve,
)
from sae.arch.spec import Site
from sae.config import PipelineConfig
from sae.data.activations import content_mask, sequence_batches
from sae.data.token_shards import iter_sequences
from sae.errors import InputError
from sae.io import manifest, model_sources, presets, saelens, storage
from sae.io.stages import StageOutput, run_stage
from sae.model import lm, spliced
from sae.progress import Progress, log

# Tokens listed per feature as raised and as lowered most by its decoder direction.
LOGIT_EFFECTS_TOP = 10
STEERING_PLOT_CAPTION = "Steering: concept against cost, with DiffMean and random baselines"


def report(config: PipelineConfig, force: bool = False) -> bool:
    """Evaluate every trained SAE on the held-out split and write `<workdir>/report`; returns
    whether the stage ran (False when its manifest already matches the config and inputs)."""
    cfg = config.report
    tokens_manifest = manifest.require(config.tokens_uri, "tokenize")
    manifest.require(config.sae_uri, "train")
    if config.train.source == "npy":
        raise InputError(
            "report evaluates on the tokenized held-out split through the language model; "
            "it needs train.source=stream or store, not npy"
        )
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
    if config.probing_uri:
        if not storage.exists(config.probing_uri):
            raise InputError(f"report.probing.data: no file at {config.probing_uri}")
        inputs["probing"] = storage.fingerprint(config.probing_uri)
    absorption_cfg = config.report.absorption
    if config.demo.enabled and not absorption_cfg.concepts and absorption_cfg.sequences:
        if not storage.exists(config.demo_concepts_uri):
            raise InputError(
                f"no demo concepts at {config.demo_concepts_uri}: re-run the demo stage "
                "(or name report.absorption.concepts, or set report.absorption.sequences=0)"
            )
        inputs["concepts"] = storage.fingerprint(config.demo_concepts_uri)
    interp = config.report.autointerp
    if interp.features and interp.explainer and not interp.endpoint:
        # A missing explainer model fails here, before the evaluation.
        presets.tokenizer_proto(model_sources.resolve(interp.explainer))

    def body() -> StageOutput:
        return _report(config, tokens_manifest, eval_shards)

    return run_stage("report", config.report_uri, dataclasses.asdict(cfg), inputs, body, force)


def planned_tokens(eval_tokens: int, tokens_manifest: dict) -> int:
    """The tokens the evaluation will see: report.eval_tokens, or fewer when the held-out
    split (as the tokenize manifest counts it) has fewer."""
    available = tokens_manifest.get("counts", {}).get("eval_tokens")
    return eval_tokens if available is None else min(eval_tokens, int(available))


def _load_saes(config: PipelineConfig, train_manifest: dict) -> tuple[dict[str, tuple], str]:
    """Every SAE the train stage exported and the one model they read, checked against it."""
    names = list(train_manifest.get("saes", {}))
    if not names:
        raise InputError(f"the train manifest at {config.sae_uri} lists no SAEs")
    loaded = {name: saelens.load(storage.join(config.sae_uri, name)) for name in names}
    models = {sae_cfg["model_preset"] for _, _, sae_cfg in loaded.values()}
    if len(models) > 1:
        raise InputError(f"the SAEs of {config.sae_uri} were trained on different models")
    preset = models.pop()
    presets.check_layers(preset, [sae_cfg["layer"] for _, _, sae_cfg in loaded.values()])
    hidden = int(presets.backbone_config(preset)["hidden_dim"])
    for name, (sae, _, sae_cfg) in loaded.items():
        saelens.check_model_dim(sae_cfg, hidden, name, preset)
        out_of_range = [i for i in config.report.steering_features if i >= sae.d_sae]
        if out_of_range:
            raise InputError(
                f"report.steering_features: feature {out_of_range[0]} is out of range "
                f"(the SAE {name} has {sae.d_sae} features)"
            )
    return loaded, preset


def _report(config: PipelineConfig, tokens_manifest: dict, eval_shards: list[str]) -> StageOutput:
    cfg, output = config.report, config.report_uri
    train_manifest = manifest.require(config.sae_uri, "train")
    saes, preset = _load_saes(config, train_manifest)
    entries = list(saes.values())
    # Judged in the same passes as the final SAEs, after them in every list.
    snapshots = token_curve.load_snapshots(config.sae_uri, train_manifest)
    curve_entries = entries + [snapshot.entry for snapshot in snapshots]
    read = [saelens.sites(sae_cfg) for _, _, sae_cfg in curve_entries]
    sites = sorted({site for pair in read for site in pair if site is not None})
    mesh = sharding.make_mesh(config.train.mesh_data, config.model.mesh_model)
    backbone = lm.load_backbone(preset, config.model.dtype)
    if cfg.spliced_sequences:
        # Before the long evaluation, not after it.
        lm.check_gemma(backbone, "; set report.spliced_sequences=0 to skip the spliced metrics")
    tap = lm.ActivationTap(backbone, sites, mesh)
    bos_id = tokens_manifest["tokenizer"]["bos_id"]
    models = [
        evaluation.EvalModel(
            sae,
            params,
            sites.index(source),
            None if target is None else sites.index(target),
            # The snapshots need their metrics only, not per-feature statistics.
            details=index < len(entries),
        )
        for index, ((sae, params, _), (source, target)) in enumerate(
            zip(curve_entries, read, strict=True)
        )
    ]
    processor = spm.SentencePieceProcessor(model_proto=presets.tokenizer_proto(preset))
    # Each final SAE with the index of the tapped site it reads (the extra passes below).
    readers = {
        name: (sae, params, sites.index(pair[0]))
        for (name, (sae, params, _)), pair in zip(saes.items(), read, strict=False)
    }
    concepts = _concepts(config)
    observers = []
    if concepts and cfg.absorption.sequences:
        # Fed the evaluation's own model batches: the concepts cost no pass of their own.
        observers.append(
            absorption.ConceptObserver(
                readers,
                processor.id_to_piece,
                concepts,
                bos_id=bos_id,
                max_sequences=cfg.absorption.sequences,
                precise=cfg.absorption.precise,
            )
        )
    progress = Progress("report", planned_tokens(cfg.eval_tokens, tokens_manifest))
    results = evaluation.evaluate(
        models,
        iter_sequences(eval_shards),
        tap,
        config.train.lm_batch_size,
        bos_id,
        cfg.eval_tokens,
        cfg.top_contexts,
        progress,
        observers,
    )
    # Evaluation ends at the end of a model batch, so a little past the plan, or short of it
    # when the split runs out (its count includes the BOS positions, which are not
    # evaluated): the last line reports what was done.
    progress.total = progress.done
    progress.close()
    results, snapshot_results = results[: len(entries)], results[len(entries) :]
    held_out = [dict(result.metrics) for result in results + snapshot_results]
    analysis_files = []
    if config.probing_uri:
        uri, added = _sparse_probing(config, tap, readers, processor, tokens_manifest)
        for name, result in zip(saes, results, strict=True):
            result.metrics.update(added[name])
        analysis_files = [uri]
    if observers:
        uri, added = _write_absorption(config, observers[0].document())
        for name, result in zip(saes, results, strict=True):
            result.metrics.update(added[name])
        analysis_files.append(uri)
    values: list[context_values.ContextValues | None] = [None] * len(saes)
    if cfg.context_values:
        entries_shown = [
            (*reader, features.most_active(result, cfg.max_features), result)
            for reader, result in zip(readers.values(), results, strict=True)
        ]
        values = list(
            context_values.context_values(tap, entries_shown, bos_id, config.train.lm_batch_size)
        )
    means = {}
    if cfg.spliced_sequences and cfg.mean_ablation_tokens:
        train_shards = tokens_manifest["shards"]["train"]
        means = _training_means(tap, iter_sequences(train_shards), config, bos_id)
    del tap  # its device copy of the weights; the spliced pass makes its own
    spliced_pass = functools.partial(
        _spliced_metrics,
        config,
        backbone,
        eval_shards=eval_shards,
        bos_id=bos_id,
        mesh=mesh,
        means=means,
    )
    if cfg.spliced_sequences:
        for result, metrics in zip(
            results, spliced_pass(entries, cfg.spliced_sequences), strict=True
        ):
            result.metrics.update(metrics)
    curve_files = []
    if snapshots:
        curve_spliced = (
            spliced_pass(curve_entries, cfg.curve_sequences, label="curve ")
            if cfg.spliced_sequences and cfg.curve_sequences
            else [{} for _ in curve_entries]
        )
        named = list(saes) + [s.name for s in snapshots]
        tokens = [sae_cfg["training_tokens"] for _, _, sae_cfg in entries]
        tokens += [s.tokens for s in snapshots]
        curves = token_curve.curve_points(
            [
                (name, t, {**metrics, **more})
                for name, t, metrics, more in zip(
                    named, tokens, held_out, curve_spliced, strict=True
                )
            ]
        )
        curve_files = _write_curve(config, curves)
    w_u = logit_effects.unembedding(backbone)
    explainer, explainer_note = _explainer(config, backbone, preset)
    training_log = plots.read_training_log(storage.join(config.sae_uri, "metrics.jsonl"))
    files: list[str] = []
    overview: list[dict] = []
    all_metrics: dict[str, dict] = {}
    for (name, (sae, params, sae_cfg)), result, shown_values in zip(
        saes.items(), results, values, strict=True
    ):
        log(
            "report",
            f"{name} held-out: "
            + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if isinstance(v, float)),
        )
        warnings = spliced.recovery_warnings(result.metrics)
        warnings += [explainer_note] if explainer_note else []
        for warning in warnings:
            log("report", f"warning: {name} {warning}")
        plots_shown = {}
        if cfg.steering_eval_features and not saelens.is_transcoder(sae_cfg["architecture"]):
            # First, so that the SAE's page shows its plot.
            files += _evaluate_steering(
                config, name, (sae, params, sae_cfg), result, backbone, tokens_manifest
            )
            plots_shown[STEERING_PLOT_CAPTION] = "steering/evaluation.png"
        files += _report_one(
            config,
            name,
            (sae, params, sae_cfg),
            result,
            processor,
            w_u,
            training_log,
            shown_values,
            plots_shown,
            warnings,
            explainer,
        )
        all_metrics[name] = {**result.metrics, **({"warnings": warnings} if warnings else {})}
        overview.append(
            {
                "name": name,
                "architecture": sae_cfg.get("trained_as", sae_cfg["architecture"]),
                "layer": sae_cfg["layer"],
                **all_metrics[name],
            }
        )
    summary_files = {
        "metrics": storage.join(output, "metrics.json"),
        "html": storage.join(output, "index.html"),
    }
    storage.write_json(
        summary_files["metrics"],
        {"split": "eval (held out by tokenize; never trained on)", "saes": all_metrics},
    )
    storage.write_text(
        summary_files["html"],
        report_html.render_overview("SAE run", overview, curve=bool(curve_files)),
    )
    counts = {
        f"{name}/{k}": v for name, m in all_metrics.items() for k, v in m.items() if k != "warnings"
    }
    outputs = files + curve_files + analysis_files + list(summary_files.values())
    return StageOutput(counts, outputs)


def _sparse_probing(
    config: PipelineConfig,
    tap: lm.ActivationTap,
    readers: dict[str, tuple],
    processor: spm.SentencePieceProcessor,
    tokens_manifest: dict,
) -> tuple[str, dict[str, dict[str, float]]]:
    """report/probing.json (sae.analysis.probing): its URI and, per SAE, the metrics it adds
    (its top-k accuracies, and that of the probe on all of its site's raw dimensions)."""
    cfg = config.report.probing
    labelled = probing.read_labelled(
        config.probing_uri, cfg.text_field, cfg.label_field, cfg.max_documents
    )
    found = probing.sparse_probing(
        tap,
        readers,
        labelled,
        processor.encode,
        bos_id=tokens_manifest["tokenizer"]["bos_id"],
        sequence_length=int(tokens_manifest["sequence_length"]),
        lm_batch_size=config.train.lm_batch_size,
        k_values=cfg.k_values,
        test_fraction=cfg.test_fraction,
        min_class_documents=cfg.min_class_documents,
        seed=cfg.seed,
    )
    uri = storage.join(config.report_uri, "probing.json")
    storage.write_json(uri, {"data": config.probing_uri, **found})
    added = {}
    for name, result in found["saes"].items():
        accuracies = result["sae_top_k_test_accuracy"]
        raw = found["sites"][result["site"]]
        added[name] = {
            **{f"sae_top_{k}_test_accuracy": v for k, v in accuracies.items()},
            "llm_test_accuracy": raw["llm_test_accuracy"],
        }
        log(
            "report",
            f"{name} sparse probing ({len(found['tasks'])} tasks, {found['documents']} "
            "documents, held-out accuracy): "
            + ", ".join(f"top {k} {v:.3f}" for k, v in accuracies.items())
            + f"; raw activations, all dimensions {raw['llm_test_accuracy']:.3f}",
        )
    return uri, added


def _concepts(config: PipelineConfig) -> dict[str, list[str]]:
    """report.absorption.concepts, or the demo's word lists (written by the demo stage) when
    demo.enabled and none are named; empty: no absorption evaluation."""
    named = {c.name: list(c.words) for c in config.report.absorption.concepts}
    if named or not config.demo.enabled:
        return named
    return storage.read_json(config.demo_concepts_uri)


def _write_absorption(
    config: PipelineConfig, found: dict
) -> tuple[str, dict[str, dict[str, float]]]:
    """report/absorption.json (sae.analysis.absorption's document): its URI and each SAE's
    means over the concepts."""
    uri = storage.join(config.report_uri, "absorption.json")
    storage.write_json(uri, {"split": "eval (held out by tokenize; never trained on)", **found})
    added = {name: absorption.headline(per_concept) for name, per_concept in found["saes"].items()}
    for name, per_concept in found["saes"].items():
        log(
            "report",
            f"{name} concepts ({found['tokens']} held-out tokens): "
            + "; ".join(
                f"{concept}: best latent {r['best_latent']['latent']} F1 "
                f"{r['best_latent']['f1']:.2f}, {len(r['split_latents'])} split, absorbed "
                f"{r['absorption_fraction']:.2f}"
                for concept, r in per_concept.items()
            ),
        )
    return uri, added


def _training_means(
    tap: lm.ActivationTap, sequences, config: PipelineConfig, bos_id: int
) -> dict[Site, np.ndarray]:
    """Each tapped site's mean activation over the first `report.mean_ablation_tokens`
    content tokens of the training split (BOS and padding left out, as in training)."""
    sums = [np.zeros(tap.hidden_dim) for _ in tap.sites]
    tokens = 0
    for token_ids, lengths in sequence_batches(sequences, config.train.lm_batch_size):
        mask = content_mask(token_ids, lengths, bos_id)
        for total, activations in zip(sums, tap(token_ids, lengths), strict=True):
            total += np.asarray(activations, np.float64)[mask].sum(axis=0)
        tokens += int(mask.sum())
        if tokens >= config.report.mean_ablation_tokens:
            break
    if not tokens:
        raise InputError("no training tokens to average for the mean-ablation baseline")
    return {site: total / tokens for site, total in zip(tap.sites, sums, strict=True)}


def _spliced_metrics(
    config: PipelineConfig,
    backbone: Any,
    entries: list[tuple],
    count: int,
    *,
    eval_shards: list[str],
    bos_id: int,
    mesh: Mesh,
    means: dict[Site, np.ndarray],
    label: str = "",
) -> list[dict[str, Any]]:
    """CE loss recovered, delta LM loss and KL of every SAE of `entries` ((sae, params, cfg)
    triples), one model pass per spliced site for all the SAEs writing it (SAEs: the residual
    stream after their layer; transcoders: that block's MLP output), on the first `count`
    held-out sequences."""
    by_site: dict[Site, list[int]] = {}
    for i, (_, _, sae_cfg) in enumerate(entries):
        source, target = saelens.sites(sae_cfg)
        by_site.setdefault(target or source, []).append(i)
    metrics: list[dict[str, Any]] = [{} for _ in entries]
    for site, indices in sorted(by_site.items()):
        models = [spliced.sae_model(entries[i][0], entries[i][1]) for i in indices]
        loss = spliced.SplicedLoss(
            backbone, site.layer, models, mesh, bos_id, means.get(site), site.point
        )
        progress = Progress(f"report {label}spliced {site.label}", count, unit="seq")
        sums = spliced.evaluate_spliced(
            loss, iter_sequences(eval_shards), config.train.lm_batch_size, count, progress
        )
        progress.close()
        for position, i in enumerate(indices):
            metrics[i] = sums.metrics(position)
    return metrics


def _write_curve(config: PipelineConfig, curves: dict[str, list[dict]]) -> list[str]:
    """report/curve.json and curve.png: each SAE's held-out metrics at its snapshots and at
    the end of training."""
    cfg = config.report
    files = {
        "json": storage.join(config.report_uri, "curve.json"),
        "png": storage.join(config.report_uri, "curve.png"),
    }
    storage.write_json(
        files["json"],
        {
            "split": "eval (held out by tokenize; never trained on)",
            "eval_tokens_planned": cfg.eval_tokens,
            "spliced_sequences": cfg.curve_sequences if cfg.spliced_sequences else 0,
            "saes": curves,
        },
    )
    storage.write_bytes(files["png"], plots.token_curves(curves))
    for name, points in curves.items():
        log(
            "report",
            f"{name} over training tokens: "
            + "; ".join(
                f"{p['training_tokens']}: delta LM loss {p.get('delta_lm_loss', float('nan')):.3f}"
                f", FVE w/o dominant {p['fraction_variance_explained_without_dominant']:.3f}"
                for p in points
            ),
        )
    return list(files.values())


def _steering_choice(cfg, params: dict, result: evaluation.EvalResult):
    """The features given steering vectors (report.steering_features, else the most active
    non-dense ones), their unit directions and suggested strengths."""
    chosen = cfg.steering_features or features.most_active(
        result, cfg.num_steering, exclude_dense=True
    )
    vectors, strengths = steering.steering_vectors(params["W_dec"], result, chosen)
    return chosen, vectors, strengths


def _evaluate_steering(
    config: PipelineConfig,
    name: str,
    entry: tuple,
    result: evaluation.EvalResult,
    backbone: Any,
    tokens_manifest: dict,
) -> list[str]:
    """report/<sae>/steering/evaluation.json and .png: the steering evaluation of the first
    report.steering_eval_features steering vectors (sae.analysis.steering_eval)."""
    from sae.model.generation import SteeredGenerator

    cfg = config.report
    sae = saelens.Sae(*entry)
    chosen, _, strengths = _steering_choice(cfg, sae.weights, result)
    generator = SteeredGenerator(backbone, presets.tokenizer_proto(sae.cfg["model_preset"]))
    held_out = steering_eval.held_out_sequences(tokens_manifest, cfg.steering_eval_sequences)
    bos_id = tokens_manifest["tokenizer"]["bos_id"]
    evaluations = []
    for feature, strength in list(zip(chosen, strengths, strict=True))[
        : cfg.steering_eval_features
    ]:
        if strength <= 0:
            continue  # never fired on the held-out tokens: nothing to scale by
        evaluated = steering_eval.evaluate_steering(
            generator,
            sae,
            int(feature),
            int(sae.cfg["layer"]),
            [scale * float(strength) for scale in cfg.steering_eval_scales],
            cfg.steering_eval_prompts,
            held_out,
            bos_id,
            lm_batch_size=config.train.lm_batch_size,
            cost_sequences=cfg.steering_eval_sequences,
            max_new_tokens=cfg.steering_eval_new_tokens,
            max_ce_increase=cfg.steering_eval_max_ce_increase,
        )
        log("report", f"{name} steering evaluation:\n{steering_eval.render(evaluated)}")
        evaluations.append(evaluated)
    output = storage.join(config.report_uri, name, "steering")
    files = {
        "json": storage.join(output, "evaluation.json"),
        "png": storage.join(output, "evaluation.png"),
    }
    storage.write_json(
        files["json"],
        {
            "strength_scales": cfg.steering_eval_scales,
            "prompts": cfg.steering_eval_prompts,
            "features": [e.to_json() for e in evaluations],
        },
    )
    storage.write_bytes(files["png"], plots.steering_tradeoffs(evaluations, name))
    return list(files.values())


def _report_one(
    config: PipelineConfig,
    name: str,
    entry: tuple,
    result: evaluation.EvalResult,
    processor: spm.SentencePieceProcessor,
    w_u: np.ndarray,
    training_log: list[dict],
    values: context_values.ContextValues | None = None,
    plots_shown: dict[str, str] | None = None,
    warnings: list[str] | None = None,
    explainer: autointerp.Explainer | None = None,
) -> list[str]:
    """metrics.json, the feature report (features.json, dashboard, plots: see
    sae.analysis.feature_report), steering vectors and, given an `explainer`, auto-interp
    (autointerp.json) of one SAE; `plots_shown` ({caption: path below the SAE's folder}) adds
    plots already written to its page; `warnings` (lines about metrics left undefined, to
    which this adds auto-interp's) go into metrics.json and onto the page."""
    warnings = [] if warnings is None else warnings
    cfg = config.report
    _, params, sae_cfg = entry
    output = storage.join(config.report_uri, name)
    preset = sae_cfg["model_preset"]
    shown = features.most_active(result, cfg.max_features)
    effects = logit_effects.top_logit_effects(params["W_dec"], w_u, shown, LOGIT_EFFECTS_TOP)
    summaries = features.feature_summaries(
        result, processor, cfg.context_window, shown, effects, values
    )
    interpreted = []
    if explainer is not None and values is not None:
        try:
            interpreted = _auto_interpret(
                config, name, explainer, summaries, result, values, processor
            )
        except autointerp.ExplainerError as error:
            warnings.append(f"auto-interp skipped: {error}")
            log("report", f"warning: {name} auto-interp skipped: {error}")
    metrics = {"split": "eval (held out by tokenize; never trained on)", **result.metrics}
    if warnings:
        metrics["warnings"] = warnings
    sae_dir = storage.join(config.sae_uri, name)
    run_info = {
        "model": preset,
        "layer": sae_cfg["hook_name"],
        "sae": sae_dir,
        "architecture": sae_cfg.get("trained_as", sae_cfg["architecture"]),
        "d_in": sae_cfg["d_in"],
        "d_sae": sae_cfg["d_sae"],
        "training_tokens": sae_cfg["training_tokens"],
    }
    chosen, vectors, strengths = _steering_choice(cfg, params, result)
    metadata = {
        "model_preset": preset,
        "layer": sae_cfg["layer"],
        "hook_name": sae_cfg["hook_name"],
        "sae": sae_dir,
    }
    files = {
        "metrics": storage.join(output, "metrics.json"),
        "steering": storage.join(output, "steering", "vectors.safetensors"),
        "steering_index": storage.join(output, "steering", "vectors.json"),
    }
    storage.write_json(files["metrics"], metrics)
    title = f"SAE report: {name} ({sae_cfg['hook_name']})"
    written = feature_report.write(
        output, name, title, metrics, run_info, result, summaries, training_log, plots_shown
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
    return list(files.values()) + written + interpreted


def _auto_interpret(
    config: PipelineConfig,
    name: str,
    explainer: autointerp.Explainer,
    summaries: list[dict[str, Any]],
    result: evaluation.EvalResult,
    values: context_values.ContextValues,
    processor: spm.SentencePieceProcessor,
) -> list[str]:
    """Explain and score the first report.autointerp.features of `summaries` (the most
    frequently active); each summary gets its explanation and score, the SAE's metrics the
    mean score, and <sae>/autointerp.json every prompt's examples and answers."""
    cfg = config.report.autointerp
    rng = random.Random(cfg.seed)
    chosen = summaries[: cfg.features]
    examples = []
    for summary in chosen:
        held_out = autointerp.feature_examples(
            summary, cfg.explain_top, cfg.explain_quantile, cfg.detection_examples
        )
        negatives = autointerp.non_activating_examples(
            result.sequences,
            values.latents,
            values.columns[summary["index"]],
            processor,
            config.report.context_window,
            len(held_out.detect),
            rng,
            avoid=held_out.spans,
        )
        examples.append(autointerp.with_negatives(held_out, negatives, rng))
    progress = Progress(f"report {name} auto-interp", len(chosen), unit="feature")
    records = autointerp.interpret(explainer, examples, cfg.detection, cfg.examples_per_prompt)
    progress.update(len(chosen))
    progress.close()
    for summary, record in zip(chosen, records, strict=True):
        summary["explanation"] = record["explanation"]
        summary["autointerp"] = {k: v for k, v in record.items() if k != "detection_examples"}
    score = autointerp.mean_balanced_accuracy(records)
    result.metrics["autointerp_features"] = len(records)
    result.metrics["autointerp_explained"] = sum(r["explanation"] is not None for r in records)
    result.metrics["autointerp_detection_balanced_accuracy"] = score
    log(
        "report",
        f"{name} auto-interp ({explainer.name}): {len(records)} features, "
        f"{result.metrics['autointerp_explained']} explained, mean detection balanced accuracy "
        + ("-" if score is None else f"{score:.3f}"),
    )
    uri = storage.join(config.report_uri, name, "autointerp.json")
    storage.write_json(
        uri,
        {
            "explainer": explainer.name,
            "prompts": {"explain": autointerp.EXPLAIN_PROMPT, "detect": autointerp.DETECT_PROMPT},
            "features": records,
        },
    )
    return [uri]


def _explainer(
    config: PipelineConfig, backbone: Any, preset: str
) -> tuple[autointerp.Explainer | None, str | None]:
    """The explainer report.autointerp names, or None and why auto-interp is skipped (an
    unreachable endpoint is a note in the report, not a failed stage)."""
    cfg = config.report.autointerp
    if not cfg.features:
        return None, None
    if cfg.endpoint:
        endpoint = autointerp.EndpointExplainer(
            cfg.endpoint,
            cfg.endpoint_model,
            cfg.api_key_env,
            cfg.max_new_tokens,
            cfg.timeout_seconds,
        )
        reason = endpoint.check()
        return (None, f"auto-interp skipped: {reason}") if reason else (endpoint, None)
    from sae.model.generation import SteeredGenerator

    if cfg.explainer:
        uri = model_sources.resolve(cfg.explainer)
        generator = SteeredGenerator.from_preset(uri, config.model.dtype)
        name = cfg.explainer
    else:
        generator = SteeredGenerator(backbone, presets.tokenizer_proto(preset))
        name = f"{preset} (the run's own model)"
    return autointerp.ModelExplainer(generator, name, cfg.max_new_tokens, cfg.batch_size), None
