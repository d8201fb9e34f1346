"""Gemma Scope's published SAEs (`params.npz`) as our on-disk SAEs.

A Gemma Scope file holds W_enc [d_model, d_sae], W_dec [d_sae, d_model], b_enc [d_sae],
b_dec [d_model] and threshold [d_sae] of a JumpReLU SAE on raw residual-stream activations
(its normalisation is already folded in): latents = relu(pre) * (pre > threshold) with
pre = x W_enc + b_enc, b_dec not subtracted from the input. It is written unchanged, as
SAELens' own Gemma Scope loader describes it (jumprelu, apply_b_dec_to_input=false), and
`saelens.load` folds b_dec into b_enc for our encoder.

`import_sae` writes the SAE to <out>/<name> in the same format the train stage writes, and
<out>/manifest.json lists it the way a train manifest lists trained SAEs, so the report stage
(with <out> = <workdir>/sae) evaluates it and writes its steering vectors. Several imports into
one <out> accumulate; a directory holding a real training run is refused.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from sae.errors import ConfigError, InputError
from sae.io import manifest, presets, saelens, storage
from sae.progress import log

KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
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


def check_params(params: dict[str, np.ndarray], where: str) -> tuple[int, int]:
    """(d_model, d_sae) of a Gemma Scope SAE; one-line InputError naming what is wrong."""
    missing = [key for key in KEYS if key not in params]
    if missing:
        raise InputError(
            f"{where}: missing {missing[0]!r} (a Gemma Scope params.npz holds {', '.join(KEYS)})"
        )
    unexpected = sorted(set(params) - set(KEYS))
    if unexpected:
        # Anything else (e.g. a scaling factor) would change what the SAE computes.
        raise InputError(f"{where}: unexpected array {unexpected[0]!r}")
    w_enc = params["W_enc"]
    if w_enc.ndim != 2:
        raise InputError(f"{where}: W_enc has shape {list(w_enc.shape)}, expected [d_model, d_sae]")
    d_model, d_sae = (int(n) for n in w_enc.shape)
    saelens.check_weights(params, d_model, d_sae, "jumprelu", where)
    return d_model, d_sae


def default_name(layer: int, d_sae: int) -> str:
    width = f"{d_sae // 1024}k" if d_sae % 1024 == 0 else str(d_sae)
    return f"gemma-scope-L{layer}-{width}"


def check_model(request: ImportRequest, d_model: int) -> None:
    """The SAE must read the model it is imported for: its layer exists, its width fits."""
    if request.layer < 0:
        raise ConfigError(f"--layer must be non-negative, got {request.layer}")
    if not storage.exists(storage.join(request.model_preset, "config.json")):
        raise InputError(f"no keras-hub preset at {request.model_preset} (config.json not found)")
    presets.check_layers(request.model_preset, [request.layer])
    hidden = int(presets.backbone_config(request.model_preset)["hidden_dim"])
    saelens.check_model_dim({"d_in": d_model}, hidden, request.params_uri, request.model_preset)


def build_config(request: ImportRequest, d_model: int, d_sae: int, name: str) -> dict[str, Any]:
    provenance = saelens.Provenance(
        layer=request.layer,
        model_preset=request.model_preset,
        model_name=request.model_name or saelens.model_name(request.model_preset),
        context_size=CONTEXT_SIZE,
        dataset_path=None,
        training_tokens=None,
    )
    return saelens.build_config(
        {"architecture": "jumprelu", "trained_as": "jumprelu"},
        d_model,
        d_sae,
        provenance,
        apply_b_dec_to_input=False,
        name=name,
        input_scale_folded=1.0,
        imported_from={
            "format": "gemma-scope params.npz",
            "uri": request.params_uri,
            "fingerprint": storage.fingerprint(request.params_uri),
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
    params = read_params(request.params_uri)
    d_model, d_sae = check_params(params, request.params_uri)
    check_model(request, d_model)
    name = request.name or default_name(request.layer, d_sae)
    if "/" in name or name in (".", ".."):
        raise ConfigError(f"--name must be a plain directory name, got {name!r}")
    weights = {key: np.asarray(params[key], np.float32) for key in KEYS}
    return PreparedSae(name, build_config(request, d_model, d_sae, name), weights)


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
    """Import the params.npz at `params_uri` (an SAE on residual-stream layer `layer` of the
    keras-hub preset `model_preset`) into `out`; returns the SAE's directory, <out>/<name>.

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
