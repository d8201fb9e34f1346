"""What `model.preset` may name, and the keras-hub preset directory each becomes.

- a keras-hub preset directory, local or gs:// (config.json with a `class_name`): used as is;
- a keras-hub preset name (`gemma3_270m`), a Kaggle handle (`kaggle://...`) or a Hugging Face
  repository (`hf://...`): downloaded and converted by keras-hub, once;
- a local Hugging Face directory (config.json with a `model_type`): converted by keras-hub's
  own converter, once;
- a `.gguf` file (local or gs://): dequantized by transformers in the GGUF environment
  (scripts/ensure_gguf.sh; torch is never in the training image), then converted by keras-hub,
  once.

Converted presets are saved (`save_to_preset`) under the local cache, in a directory named by
the source's sha256 (or its fingerprint, or its handle), with `source.json` beside the model
saying where it came from; so the manifests of the stages that read the model, which record
its path and fingerprint, name the source. Conversion prints one line; the next run finds the
cached preset.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from sae.errors import InputError
from sae.io import storage
from sae.progress import log

HUB_SCHEMES = ("hf://", "kaggle://")
GGUF_MAGIC = b"GGUF"
SOURCE_NAME = "source.json"
# The GGUF environment's Python: this variable, else .venv-gguf beside the package's checkout.
GGUF_PYTHON_VARIABLE = "GEMMA_SAE_GGUF_PYTHON"
_WORKER = Path(__file__).with_name("gguf_worker.py")


def resolve(preset: str) -> str:
    """The keras-hub preset directory `preset` names (converting it the first time)."""
    if preset.endswith(".gguf"):
        return _gguf_preset(preset)
    if preset.startswith(HUB_SCHEMES) or _is_preset_name(preset):
        return _hub_preset(preset)
    if _is_hugging_face_directory(preset):
        return _hugging_face_preset(preset)
    return preset


def gguf_python() -> Path:
    """The Python of the GGUF environment, checked."""
    default = Path(__file__).resolve().parents[2] / ".venv-gguf" / "bin" / "python"
    python = Path(os.environ.get(GGUF_PYTHON_VARIABLE) or default)
    if not python.exists():
        raise InputError(
            f"a .gguf model needs the GGUF environment (torch, transformers): run "
            f"`bash scripts/ensure_gguf.sh`, or set {GGUF_PYTHON_VARIABLE} to its Python"
        )
    return python


def run_worker(*args: str) -> None:
    """sae/io/gguf_worker.py in the GGUF environment; its one-line error becomes ours."""
    done = subprocess.run(
        [str(gguf_python()), str(_WORKER), *args], capture_output=True, text=True, check=False
    )
    if done.returncode:
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        last = errors[-1][len("error: ") :] if errors else _last_line(done.stderr)
        raise InputError(last)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "the GGUF worker failed without a message"


# --- the kinds of source ---------------------------------------------------------------


def _is_preset_name(preset: str) -> bool:
    """A bare keras-hub preset name (no path separators, not a local path)."""
    if not re.fullmatch(r"[a-z0-9_.-]+", preset) or os.path.exists(preset):
        return False
    import keras_hub

    return preset in keras_hub.models.Backbone.presets


def _is_hugging_face_directory(preset: str) -> bool:
    config = Path(preset) / "config.json"
    if storage.is_gcs(preset) or not config.is_file():
        return False
    try:
        found = json.loads(config.read_text())
    except (ValueError, OSError):
        return False
    return "model_type" in found and "class_name" not in found


def _fingerprint(path: Path) -> str:
    """storage's content fingerprint of a local file (its sha256) or directory, hashed once
    per state of its files: `model.preset` is resolved at every use, the files are large."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _hashed(str(path), path.is_file(), stats)


@functools.cache
def _hashed(uri: str, is_file: bool, stats: tuple) -> str:
    digest = storage.fingerprint(uri) if is_file else storage.fingerprint_tree(uri)
    return digest.removeprefix("sha256:")


def _gguf_preset(uri: str) -> str:
    if not storage.exists(uri):
        raise InputError(f"no GGUF file at {uri}")
    path = storage.local_copy(uri)
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise InputError(f"{uri} is not a GGUF file (it does not start with 'GGUF')")
    sha = _fingerprint(path)
    dest = storage.cache_dir("presets", f"gguf-{sha}")

    def convert(tmp: Path) -> None:
        hugging_face = tmp / "hugging-face"
        run_worker("convert", str(path), str(hugging_face))
        _save_keras_preset(str(hugging_face), tmp / "keras")

    named = uri if storage.is_gcs(uri) else os.path.abspath(uri)
    return _cached(dest, {"source": named, "sha256": sha, "via": "transformers GGUF"}, convert)


def _hugging_face_preset(directory: str) -> str:
    digest = _fingerprint(Path(directory))
    dest = storage.cache_dir("presets", f"hf-{digest}")
    source = {"source": os.path.abspath(directory), "fingerprint": digest}
    return _cached(dest, source, lambda tmp: _save_keras_preset(directory, tmp / "keras"))


def _hub_preset(handle: str) -> str:
    dest = storage.cache_dir("presets", "hub-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", handle))
    return _cached(dest, {"source": handle}, lambda tmp: _save_keras_preset(handle, tmp / "keras"))


# --- conversion --------------------------------------------------------------------------


def _cached(dest: Path, source: dict, convert) -> str:
    """`dest` if an earlier conversion finished it, else `convert(tmp)` (which leaves the
    preset in tmp/keras), moved into place with source.json."""
    if (dest / SOURCE_NAME).is_file():
        return str(dest)
    log("model", f"converting {source['source']} into a keras-hub preset at {dest} (once)")
    shutil.rmtree(dest, ignore_errors=True)  # an unfinished copy (no source.json)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
        convert(Path(tmp))
        preset = Path(tmp) / "keras"
        (preset / SOURCE_NAME).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
        # Another process may have finished first: then keep its copy.
        staged = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}")
        os.replace(preset, staged)
        try:
            os.replace(staged, dest)
        except OSError:
            shutil.rmtree(staged, ignore_errors=True)
    return str(dest)


def _save_keras_preset(source: str, out: Path) -> None:
    """keras-hub's own loading of `source` (any form its from_preset takes), saved as a
    keras-hub preset at float32."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras_hub

    try:
        causal_lm = keras_hub.models.CausalLM.from_preset(source, dtype="float32")
    except Exception as error:  # keras-hub's and the hubs' many kinds
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise InputError(f"keras-hub cannot load the model {source}: {reason}") from None
    causal_lm.save_to_preset(str(out))


if __name__ == "__main__":  # `python -m sae.io.model_sources MODEL`: convert, print the path
    print(resolve(sys.argv[1]))
