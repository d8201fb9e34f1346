"""Config loading: defaults, the shipped configs, and one-line errors for bad keys and values."""

import dataclasses
from pathlib import Path

import pytest

from sae import config
from sae.arch import SaeSpec
from sae.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_local_yaml_spells_out_the_defaults():
    from_file = config.load(str(ROOT / "configs" / "local.yaml"))
    assert dataclasses.asdict(from_file) == dataclasses.asdict(config.load())


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config.load(str(path))


def test_overrides_are_typed():
    cfg = config.load(
        None,
        [
            "train.steps=7",
            "train.lr_warmup_steps=2",
            "train.saes.0.learning_rate=2e-3",
            "demo.enabled=false",
            "tokenize.input=/data/*.jsonl",
            "model.preset=/p",
            "report.steering_features=[1, 2]",
        ],
    )
    assert cfg.train.steps == 7
    assert cfg.train.saes[0].learning_rate == pytest.approx(0.002)
    assert cfg.demo.enabled is False
    assert cfg.report.steering_features == [1, 2]


def test_derived_paths_follow_workdir():
    cfg = config.load(None, ["workdir=gs://bucket/run"])
    assert cfg.tokens_uri == "gs://bucket/run/tokens"
    assert cfg.preset_uri == "gs://bucket/run/model"
    assert cfg.corpus_uri == "gs://bucket/run/corpus/*.jsonl"


DATAFLOW = [
    "tokenize.runner=dataflow",
    "tokenize.dataflow.project=my-project",
    "tokenize.dataflow.region=us-west4",
    "tokenize.dataflow.temp_location=gs://b/tmp",
]


def test_dataflow_settings_load():
    cfg = config.load(
        None, [*DATAFLOW, "workdir=gs://b/run", "tokenize.dataflow.max_num_workers=8"]
    )
    assert cfg.tokenize.dataflow.project == "my-project"
    assert cfg.tokenize.dataflow.max_num_workers == 8
    gemma = config.load(
        str(ROOT / "configs" / "gemma2-2b-v5e-8.yaml"), ["tokenize.runner=dataflow"]
    )
    assert gemma.tokenize.dataflow.temp_location.startswith("gs://")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.stpes=3"], "unknown config key 'train.stpes' (did you mean 'train.steps'?)"),
        (["trian.steps=3"], "unknown config key 'trian'"),
        (["train.steps=abc"], "config key 'train.steps' must be an integer, got 'abc'"),
        (["train.steps=1.5"], "config key 'train.steps' must be an integer"),
        (["demo.enabled=3"], "config key 'demo.enabled' must be true or false"),
        (["tokenize.format=xml"], "config key 'tokenize.format' must be one of 'jsonl', 'text'"),
        (["train.steps=0"], "train.steps must be positive"),
        (
            ["train.saes.0.sparsity_coefficient=-1"],
            "train.saes[0].sparsity_coefficient must not be negative",
        ),
        (["train.saes.3.k=2"], "'3' is not an index of a list of 2 items"),
        (["train.saes.0.kk=2"], "unknown config key 'train.saes[0].kk' (did you mean"),
        (["train.saes=[]"], "train.saes must list at least one SAE"),
        (["train.saes.1.k=0"], "train.saes[1].k must be positive"),
        (["train.saes.1.resample_every=5"], "resample_every is for relu SAEs"),
        (["train.saes.0.target_l0=5"], "train.saes[0].target_l0 is for jumprelu SAEs, not relu"),
        (
            [
                "train.saes.1.architecture=jumprelu",
                "train.saes.1.jumprelu_sparsity_loss_mode=quadratic",
            ],
            "train.saes[1]: jumprelu_sparsity_loss_mode 'quadratic' needs target_l0 > 0",
        ),
        (
            ["train.saes.1.architecture=jumprelu", "train.saes.1.target_l0=5"],
            "target_l0 is read only by jumprelu_sparsity_loss_mode 'quadratic'",
        ),
        (
            ["train.saes.1.jumprelu_sparsity_loss_mode=l1"],
            "must be one of 'step', 'quadratic', 'tanh', got 'l1'",
        ),
        (
            ["train.saes.1.architecture=matryoshka_batchtopk"],
            "train.saes[1].matryoshka_widths must list the nested widths",
        ),
        (
            [
                "train.saes.1.architecture=matryoshka_batchtopk",
                "train.saes.1.matryoshka_widths=[64,32]",
            ],
            "matryoshka_widths must be positive and strictly increasing, got [64, 32]",
        ),
        (
            ["train.saes.1.matryoshka_widths=[64]"],
            "matryoshka settings are for matryoshka_batchtopk",
        ),
        (["train.saes.1.architecture=relu"], "two SAEs share the name 'relu-L2-x8-c2'"),
        (["train.lr_warmup_steps=590"], "do not fit in train.steps (600)"),
        (["train.source=npy"], "train.activations (.npy files) is required"),
        (["tokenize.eval_fraction=1.5"], "tokenize.eval_fraction must be in [0, 1)"),
        (["tokenize.packing=stream"], "'tokenize.packing' must be one of 'pack', 'document'"),
        (
            ["tokenize.runner=dataflow", "workdir=gs://b/run"],
            "tokenize.dataflow.project is required when tokenize.runner is dataflow",
        ),
        (
            [*DATAFLOW[:3], "tokenize.dataflow.temp_location=/tmp/x", "workdir=gs://b/run"],
            "tokenize.dataflow.temp_location must be a gs:// URI, got '/tmp/x'",
        ),
        (DATAFLOW, "workdir must be a gs:// URI when tokenize.runner is dataflow"),
        (
            [*DATAFLOW, "workdir=gs://b/run", "tokenize.input=gs://b/a.jsonl,/data/b.jsonl"],
            "tokenize.input must be gs:// URIs when tokenize.runner is dataflow, got '/data/b",
        ),
        (
            ["tokenize.dataflow.max_workers=3"],
            "unknown config key 'tokenize.dataflow.max_workers' (did you mean "
            "'tokenize.dataflow.max_num_workers'?)",
        ),
        (["train"], "must look like key=value"),
        (
            ["report.autointerp.detection=guess"],
            "'report.autointerp.detection' must be one of 'probability', 'list'",
        ),
        (
            ["report.autointerp.endpoint=http://h/v1"],
            "endpoint needs report.autointerp.endpoint_model",
        ),
        (
            ["report.autointerp.endpoint=h:8000", "report.autointerp.endpoint_model=m"],
            "report.autointerp.endpoint must be an http(s) URL, not 'h:8000'",
        ),
        (["report.context_values=false"], "report.autointerp needs report.context_values"),
        (["report.autointerp.features=-1"], "autointerp.features must not be negative"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        config.load(None, overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_checks_against_the_model_name_the_width():
    fits = SaeSpec(architecture="matryoshka_batchtopk", matryoshka_widths=(64, 512))
    fits.check_against_model("s", d_model=64, model_shards=1)  # width 64 x 8
    short = SaeSpec(architecture="matryoshka_batchtopk", matryoshka_widths=(64, 256))
    with pytest.raises(ConfigError, match=r"must end at the SAE's width 512 \(d_model 64 x"):
        short.check_against_model("s", d_model=64, model_shards=1)
    quadratic = SaeSpec(
        architecture="jumprelu", jumprelu_sparsity_loss_mode="quadratic", target_l0=600
    )
    with pytest.raises(ConfigError, match="target_l0=600 exceeds the width 512"):
        quadratic.check_against_model("s", d_model=64, model_shards=1)


def test_corpus_and_model_are_required_by_the_stages_that_read_them():
    """Without the demo, a config may leave out the corpus and the model (training from .npy
    files or a store reads neither); the stages that read them ask for them."""
    loaded = config.load(None, ["demo.enabled=false", "train.source=npy", "train.activations=x"])
    for key in ("tokenize.input", "model.preset"):
        with pytest.raises(ConfigError, match=f"^{key} is required when demo.enabled is false$"):
            loaded.require(key)
    config.load(None, ["tokenize.input=c.jsonl", "model.preset=m"]).require("model.preset")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(str(bad))
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        config.load(str(listing))
