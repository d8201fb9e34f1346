"""The layout of `sae/` and `jobs/` (docs/ARCHITECTURE.md), checked on the source with `ast`.

Nothing here imports the modules it checks: every import statement in every module under
`sae/` is read, at any depth (inside functions too), as `import sae.x`, `from sae.x import y`,
`from sae import x`, a relative import, or `importlib.import_module("sae.x")`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAE = ROOT / "sae"
JOBS = ROOT / "jobs"

# Top-level modules of the base layer; they import nothing from `sae` but each other.
BASE_MODULES = ("errors", "sharding", "progress")
# Layers, lowest first: a module may import from its own layer and the layers before it.
# `base` is BASE_MODULES, `api` is sae/__init__.py and any sae/api*.py (or sae/api*/),
# every other name is the folder (or top-level module) of that name.
LAYERS = ("base", "arch", "io", "config", "data", "model", "training", "analysis", "api")
RANK = {name: rank for rank, name in enumerate(LAYERS)}
# sae/demo/ may import any layer below the API; only these layers may import sae/demo/.
DEMO = "demo"
DEMO_IMPORTERS = ("demo", "api")

# The command-line stage modules of jobs/, which stay thin: the logic lives in sae/.
JOB_STAGE_MODULES = (
    "cli.py",
    "pipeline.py",
    "demo.py",
    "tokenize.py",
    "extract.py",
    "train.py",
    "report.py",
    "steer.py",
    "import_sae.py",
    "export_neuronpedia.py",
    "export_transformers.py",
)
MAX_JOB_LINES = 120
# An __init__.py docstring of a folder of sae/: one short paragraph.
MAX_PACKAGE_DOC_LINES = 3


@dataclass(frozen=True)
class Import:
    path: Path  # the importing file
    line: int
    target: str  # the imported module, absolute (`sae.io.storage`, `jobs.cli`, `numpy`)

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def module_name(path: Path, root: Path | None = None) -> str:
    """`sae/io/storage.py` -> `sae.io.storage`; `sae/io/__init__.py` -> `sae.io`."""
    parts = list(path.relative_to(root or ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_sae_module(name: str, root: Path | None = None) -> bool:
    """Whether `name` (`sae.x.y`) is a module or package on disk."""
    base = (root or ROOT).joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path, source: str | None = None, root: Path | None = None) -> list[Import]:
    """Every module `path` imports, at any depth, with relative imports made absolute.

    `from p import n` counts as importing `p.n` where that is a module of `sae`, else `p`.
    """
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_sub = base.split(".")[0] == "sae" and is_sae_module(sub, root)
                found.append(Import(path, node.lineno, sub if is_sub else base))
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(Import(path, node.lineno, node.args[0].value))
    return sorted(found, key=lambda imp: imp.line)


def layer_of(name: str) -> str | None:
    """The layer of module `sae...`, `demo` for sae/demo/, None if it is in none."""
    parts = name.split(".")
    if parts == ["sae"]:
        return "api"
    head = parts[1]
    if head in BASE_MODULES:
        return "base"
    if head.startswith("api"):
        return "api"
    if head == DEMO:
        return DEMO
    if head in RANK and head not in ("base", "api"):
        return head
    return None


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def sae_files() -> list[Path]:
    return sorted(p for p in SAE.rglob("*.py") if "__pycache__" not in p.parts)


def rule_broken(source: str, target: str) -> str | None:
    """Which import rule `source` importing `target` breaks (both layers of `layer_of`)."""
    if target == DEMO:
        if source not in DEMO_IMPORTERS:
            return f"only {', '.join(DEMO_IMPORTERS)} may import sae.demo"
        return None
    if source == DEMO:
        if target == "api":
            return "sae.demo may import any layer below the API, not the API"
        return None
    if RANK[target] > RANK[source]:
        return f"a module imports its own layer and lower ones only ({' < '.join(LAYERS)})"
    return None


# --- the checker itself ---------------------------------------------------------------------


def test_imports_of_reads_every_form(tmp_path: Path) -> None:
    (tmp_path / "sae" / "data").mkdir(parents=True)
    for name in ("sae/__init__.py", "sae/sharding.py", "sae/data/__init__.py"):
        (tmp_path / name).write_text("")
    (tmp_path / "sae" / "data" / "corpus.py").write_text("")
    source = (
        "import numpy\n"
        "import sae.io.storage\n"
        "from sae import sharding, load_config\n"
        "from sae.data import corpus, Reader\n"
        "from . import corpus\n"
        "from ..model import lm\n"
        "def f():\n"
        "    from sae.train import step\n"
        "    importlib.import_module('jobs.cli')\n"
    )
    found = imports_of(tmp_path / "sae" / "data" / "x.py", source, root=tmp_path)
    assert [(i.line, i.target) for i in found] == [
        (1, "numpy"),
        (2, "sae.io.storage"),
        (3, "sae.sharding"),
        (3, "sae"),
        (4, "sae.data.corpus"),
        (4, "sae.data"),
        (5, "sae.data.corpus"),
        (6, "sae.model"),
        (8, "sae.train"),
        (9, "jobs.cli"),
    ]


def test_layer_of() -> None:
    assert layer_of("sae") == "api"
    assert layer_of("sae.api_steer") == "api"
    assert layer_of("sae.errors") == "base"
    assert layer_of("sae.io.storage") == "io"
    assert layer_of("sae.config") == "config"
    assert layer_of("sae.demo.corpus") == "demo"
    assert layer_of("sae.elsewhere") is None
    assert rule_broken("model", "data") is None
    assert rule_broken("io", "config") is not None
    assert rule_broken("data", "demo") is not None
    assert rule_broken("demo", "analysis") is None
    assert rule_broken("demo", "api") is not None


# --- the rules ------------------------------------------------------------------------------


def test_every_module_is_in_a_layer() -> None:
    homeless = [
        f"{p.relative_to(ROOT)} ({module_name(p)}): in no layer; add it to LAYERS in "
        "tests/test_layout.py and to docs/ARCHITECTURE.md, or move it into a layer's folder"
        for p in sae_files()
        if layer_of(module_name(p)) is None
    ]
    assert not homeless, "\n".join(homeless)


def test_imports_follow_the_layers() -> None:
    broken = []
    for path in sae_files():
        source = module_name(path)
        source_layer = layer_of(source)
        if source_layer is None:
            continue  # test_every_module_is_in_a_layer
        for imp in imports_of(path):
            if not in_package(imp.target, "sae"):
                continue
            target_layer = layer_of(imp.target)
            if target_layer is None:
                rule = "the imported module is in no layer (or does not exist)"
            else:
                rule = rule_broken(source_layer, target_layer)
            if rule:
                broken.append(
                    f"{imp.where()}: {source} ({source_layer}) imports {imp.target} "
                    f"({target_layer}): {rule}"
                )
    assert not broken, "\n".join(broken)


def test_sae_does_not_import_jobs() -> None:
    broken = [
        f"{imp.where()}: {module_name(imp.path)} imports {imp.target}: "
        "nothing in sae/ imports jobs/"
        for path in sae_files()
        for imp in imports_of(path)
        if in_package(imp.target, "jobs")
    ]
    assert not broken, "\n".join(broken)


def test_every_folder_has_a_short_docstring() -> None:
    problems = []
    folders = sorted({p.parent for p in sae_files()})
    for folder in folders:
        init = folder / "__init__.py"
        where = init.relative_to(ROOT)
        if not init.is_file():
            problems.append(f"{where}: missing (every folder of sae/ is a package)")
            continue
        doc = (ast.get_docstring(ast.parse(init.read_text())) or "").strip()
        if not doc:
            problems.append(f"{where}: no docstring saying what the folder owns")
        elif folder != SAE and ("\n\n" in doc or doc.count("\n") >= MAX_PACKAGE_DOC_LINES):
            problems.append(
                f"{where}: docstring longer than one paragraph of {MAX_PACKAGE_DOC_LINES} lines"
            )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", JOB_STAGE_MODULES)
def test_job_stage_module_is_thin(name: str) -> None:
    path = JOBS / name
    assert path.is_file(), f"jobs/{name} is gone: update JOB_STAGE_MODULES in tests/test_layout.py"
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_JOB_LINES, (
        f"jobs/{name} has {lines} lines, over {MAX_JOB_LINES}: a stage module of jobs/ parses "
        "its arguments and calls sae/; move the logic into sae/"
    )
