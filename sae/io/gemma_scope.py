"""Gemma Scope's published SAEs as our on-disk SAEs: Gemma Scope 1 (Gemma 2, `params.npz`)
and Gemma Scope 2 (Gemma 3, a folder of `config.json` + `params.safetensors`).

Both hold W_enc [d_model, d_sae], W_dec [d_sae, d_model], b_enc [d_sae], b_dec [d_model] and
threshold [d_sae] of a JumpReLU SAE on raw residual-stream activations (its normalisation is
already folded in): latents = relu(pre) * (pre > threshold) with pre = x W_enc + b_enc, b_dec
not subtracted from the input. Gemma Scope 2 spells the keys in lowercase (w_enc, w_dec, ...)
and its config.json says the architecture ("jump_relu") and the Hugging Face hook it reads
(`model.layers.<n>.output` for the residual stream after block n). The weights are written
unchanged, as SAELens' own Gemma Scope loaders describe them (jumprelu,
apply_b_dec_to_input=false), and `saelens.load` folds b_dec into b_enc for our encoder.
Gemma Scope 2's transcoders (config.json: `hf_hook_point_in` the block's
`pre_feedforward_layernorm.output`, `hf_hook_point_out` its `post_feedforward_layernorm.output`)
come in as JumpReLU transcoders, with `affine_skip_connection` [d_in, d_out] as a skip
transcoder's W_skip (transposed, SAELens' layout). Its attention- and MLP-output SAEs read
hooks the report does not tap: they are refused in one line.

`import_sae` writes the SAE to <out>/<name> in the same format the train stage writes, and
<out>/manifest.json lists it the way a train manifest lists trained SAEs, so the report stage
(with <out> = <workdir>/sae) evaluates it and writes its steering vectors. Several imports into
one <out> accumulate; a directory holding a real training run is refused.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors

from sae.errors import ConfigError, InputError
from sae.io import manifest, model_sources, presets, saelens, storage
from sae.progress import log

KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
# Gemma Scope 2's names of the same tensors.
LOWERCASE_KEYS = {key.lower(): key for key in KEYS}
GEMMA_SCOPE_2_PARAMS = "params.safetensors"
GEMMA_SCOPE_2_CONFIG = "config.json"
# The Hugging Face hooks our tap reads: the residual stream after block n, and block n's MLP
# input and output (a transcoder's).
RESIDUAL_HOOK = re.compile(r"model\.layers\.(\d+)\.output")
MLP_IN_HOOK = re.compile(r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.output")
MLP_OUT_HOOK = re.compile(r"model\.layers\.(\d+)\.post_feedforward_layernorm\.output")
SKIP_KEY = "affine_skip_connection"
# The length of the sequences Gemma Scope was trained on.
CONTEXT_SIZE = 1024
# The stage whose manifest imports write: what the report stage reads SAEs from.
STAGE = "train"


@dataclass(frozen=True)
class ImportRequest:
    params_uri: str
    layer: int
    model_preset: str
    # Directory name of the SAE; empty: gemma-scope-L<layer>-<width>.
    name: str = ""
    # TransformerLens name for SAELens' metadata; empty: from the preset's shape.
    model_name: str = ""


@dataclass(frozen=True)
class Published:
    """A published SAE as read: its arrays under our key names, the file they came from, its
    format's name, and the layer its config.json names (Gemma Scope 2), if any."""

    params: dict[str, np.ndarray]
    params_uri: str
    format: str
    layer: int | None = None
    # "sae", or Gemma Scope 2's "transcoder" / "skip_transcoder".
    kind: str = "sae"

    @property
    def architecture(self) -> str:
        """cfg.json's name for it (SAELens')."""
        return "jumprelu" if self.kind == "sae" else f"jumprelu_{self.kind}"


def read_published(uri: str) -> Published:
    """A Gemma Scope 1 params.npz, or a Gemma Scope 2 folder (or its params.safetensors)."""
    if uri.endswith(".npz"):
        return Published(read_params(uri), uri, "gemma-scope params.npz")
    params_uri = uri if uri.endswith(".safetensors") else storage.join(uri, GEMMA_SCOPE_2_PARAMS)
    if not storage.exists(params_uri):
        raise InputError(
            f"no Gemma Scope SAE at {uri} (expected a params.npz, or a Gemma Scope 2 folder "
            f"holding {GEMMA_SCOPE_2_PARAMS})"
        )
    try:
        raw = load_safetensors(storage.read_bytes(params_uri))
    except (SafetensorError, ValueError, TypeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"{params_uri} is not a readable safetensors file ({reason})") from None
    params = {LOWERCASE_KEYS.get(key, key): value for key, value in raw.items()}
    if SKIP_KEY in params:
        params["W_skip"] = np.ascontiguousarray(np.asarray(params.pop(SKIP_KEY)).T)
    config_uri = storage.join(storage.parent(params_uri), GEMMA_SCOPE_2_CONFIG)
    layer, kind = None, "skip_transcoder" if "W_skip" in params else "sae"
    if storage.exists(config_uri):
        layer, transcoder = _gemma_scope_2_hooks(config_uri)
        if transcoder:
            kind = "skip_transcoder" if "W_skip" in params else "transcoder"
        elif kind != "sae":
            raise InputError(f"{params_uri}: {SKIP_KEY} in a residual-stream SAE")
    return Published(params, params_uri, "gemma-scope-2 params.safetensors", layer, kind)


def _gemma_scope_2_hooks(config_uri: str) -> tuple[int | None, bool]:
    """(layer, is a transcoder) of a Gemma Scope 2 config.json: a residual-stream SAE, or a
    transcoder from a block's MLP input to its output; other kinds are refused."""
    try:
        cfg = json.loads(storage.read_text(config_uri))
    except ValueError:
        raise InputError(f"{config_uri} is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{config_uri} must hold a JSON object")
    if cfg.get("architecture", "jump_relu") != "jump_relu":
        raise InputError(
            f"{config_uri}: architecture {cfg.get('architecture')!r}, expected 'jump_relu'"
        )
    hook, hook_out = cfg.get("hf_hook_point_in"), cfg.get("hf_hook_point_out")
    if hook_out is not None:
        source, target = MLP_IN_HOOK.fullmatch(str(hook)), MLP_OUT_HOOK.fullmatch(str(hook_out))
        if not (source and target and source.group(1) == target.group(1)):
            raise InputError(
                f"{config_uri}: maps {hook} to {hook_out}; only transcoders from a block's "
                "pre_feedforward_layernorm.output to its post_feedforward_layernorm.output "
                "are imported"
            )
        return int(source.group(1)), True
    if hook is None:
        return None, False
    match = RESIDUAL_HOOK.fullmatch(str(hook))
    if not match:
        raise InputError(
            f"{config_uri}: reads {hook}; only residual-stream SAEs "
            "(model.layers.<n>.output) and MLP transcoders are imported"
        )
    return int(match.group(1)), False


def read_params(uri: str) -> dict[str, np.ndarray]:
    """The arrays of a params.npz (local or gs://)."""
    if not storage.exists(uri):
        raise InputError(f"no Gemma Scope params at {uri}")
    try:
        with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"{uri} is not a readable .npz file ({reason})") from None


def check_params(
    params: dict[str, np.ndarray], where: str, architecture: str = "jumprelu"
) -> tuple[int, int]:
    """(d_model, d_sae) of a Gemma Scope SAE; one-line InputError naming what is wrong."""
    keys = (*KEYS, "W_skip") if "skip" in architecture else KEYS
    missing = [key for key in keys if key not in params]
    if missing:
        raise InputError(
            f"{where}: missing {missing[0]!r} (a Gemma Scope SAE holds {', '.join(KEYS)})"
        )
    unexpected = sorted(set(params) - set(keys))
    if unexpected:
        # Anything else (e.g. a scaling factor) would change what the SAE computes.
        raise InputError(f"{where}: unexpected array {unexpected[0]!r}")
    w_enc = params["W_enc"]
    if w_enc.ndim != 2:
        raise InputError(f"{where}: W_enc has shape {list(w_enc.shape)}, expected [d_model, d_sae]")
    d_model, d_sae = (int(n) for n in w_enc.shape)
    saelens.check_weights(params, d_model, d_sae, architecture, where)
    return d_model, d_sae


def default_name(layer: int, d_sae: int, kind: str = "sae") -> str:
    width = f"{d_sae // 1024}k" if d_sae % 1024 == 0 else str(d_sae)
    what = "" if kind == "sae" else f"{kind.replace('_', '-')}-"
    return f"gemma-scope-{what}L{layer}-{width}"


def check_model(request: ImportRequest, d_model: int) -> None:
    """The SAE must read the model it is imported for: its layer exists, its width fits."""
    if request.layer < 0:
        raise ConfigError(f"--layer must be non-negative, got {request.layer}")
    # A .gguf file, Hugging Face directory or hub handle is converted once (model_sources).
    preset = model_sources.resolve(request.model_preset)
    if not storage.exists(storage.join(preset, "config.json")):
        raise InputError(f"no keras-hub preset at {request.model_preset} (config.json not found)")
    presets.check_layers(preset, [request.layer])
    hidden = int(presets.backbone_config(preset)["hidden_dim"])
    saelens.check_model_dim({"d_in": d_model}, hidden, request.params_uri, request.model_preset)


def build_config(
    request: ImportRequest, published: Published, d_model: int, d_sae: int, name: str
) -> dict[str, Any]:
    provenance = saelens.Provenance(
        layer=request.layer,
        model_preset=request.model_preset,
        model_name=request.model_name
        or saelens.model_name(model_sources.resolve(request.model_preset)),
        context_size=CONTEXT_SIZE,
        dataset_path=None,
        training_tokens=None,
    )
    return saelens.build_config(
        {"architecture": published.architecture, "trained_as": "jumprelu"},
        d_model,
        d_sae,
        provenance,
        apply_b_dec_to_input=False,
        name=name,
        input_scale_folded=1.0,
        imported_from={
            "format": published.format,
            "uri": request.params_uri,
            "fingerprint": storage.fingerprint(published.params_uri),
        },
    )


@dataclass(frozen=True)
class PreparedSae:
    """A checked import, not yet written."""

    name: str
    cfg: dict[str, Any]
    weights: dict[str, np.ndarray]


def prepare(request: ImportRequest) -> PreparedSae:
    """Read and check everything (file, shapes, values, model); writes nothing."""
    published = read_published(request.params_uri)
    params = published.params
    if published.layer is not None and published.layer != request.layer:
        raise ConfigError(
            f"--layer {request.layer}, but {request.params_uri} reads layer {published.layer}"
        )
    d_model, d_sae = check_params(params, published.params_uri, published.architecture)
    check_model(request, d_model)
    name = request.name or default_name(request.layer, d_sae, published.kind)
    if "/" in name or name in (".", ".."):
        raise ConfigError(f"--name must be a plain directory name, got {name!r}")
    weights = {key: np.asarray(value, np.float32) for key, value in params.items()}
    cfg = build_config(request, published, d_model, d_sae, name)
    return PreparedSae(name, cfg, weights)


def write(prepared: PreparedSae, out: str) -> list[str]:
    """The SAE under <out>/<name>, like a trained one; returns the files written."""
    return saelens.save(storage.join(out, prepared.name), prepared.weights, prepared.cfg)


def import_sae(
    params_uri: str,
    layer: int,
    model_preset: str,
    out: str,
    name: str = "",
    model_name: str = "",
) -> str:
    """Import the Gemma Scope SAE at `params_uri` (a Gemma Scope 1 params.npz, or a Gemma
    Scope 2 folder or its params.safetensors), on residual-stream layer `layer` of the
    keras-hub preset `model_preset`, into `out`; returns the SAE's directory, <out>/<name>.

    `name` defaults to gemma-scope-L<layer>-<width>, `model_name` (SAELens' TransformerLens
    name) to one from the preset's shape. Everything is checked first; then the SAE's files
    are written, then the manifest (last)."""
    request = ImportRequest(params_uri, layer, model_preset, name, model_name)
    prepared = prepare(request)
    previous = _previous_imports(out, model_preset)
    storage.check_writable(out)
    files = write(prepared, out)
    saes = {**previous.get("saes", {}), prepared.name: prepared.cfg}
    sources = {
        **previous.get("inputs", {}),
        prepared.name: prepared.cfg["imported_from"]["fingerprint"],
    }
    outputs = sorted(set(previous.get("outputs", [])) | set(files))
    config = {"import": {key: cfg["imported_from"]["uri"] for key, cfg in saes.items()}}
    counts = {"saes": len(saes), "steps": 0, "tokens": 0}
    extra = {"saes": saes, "imported": True}
    manifest.write(out, STAGE, config, sources, counts, outputs, extra)
    log("import", f"{prepared.name}: {prepared.cfg['d_in']}->{prepared.cfg['d_sae']} at {out}")
    return storage.join(out, prepared.name)


def _previous_imports(out: str, model_preset: str) -> dict[str, Any]:
    """The manifest of earlier imports into `out` (empty if none); refuses a training run's
    output, and SAEs of another model (the report evaluates them all on one model)."""
    found = manifest.read(out)
    if found is None:
        return {}
    if not found.get("imported"):
        raise InputError(f"{out} holds a {found.get('stage', 'stage')} output; import elsewhere")
    others = sorted(
        {str(cfg.get("model_preset")) for cfg in found.get("saes", {}).values()} - {model_preset}
    )
    if others:
        raise InputError(
            f"{out} holds SAEs of the model at {others[0]}, not {model_preset}; import elsewhere"
        )
    return found
