"""The settings of one SAE, shared by the config (`train.saes`), the architectures, the
optimizer and the Python API: the one place they are declared."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sae.errors import ConfigError

Architecture = Literal["relu", "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu"]
# What a dictionary maps: its input to itself (an SAE), or the MLP's input to its output.
Kind = Literal["sae", "transcoder", "skip_transcoder"]
# Where the per-step sparsity pressure of a JumpReLU comes from (SAELens' names).
JumpReluSparsityLossMode = Literal["step", "quadratic", "tanh"]


# Where in a block activations are read, in the order a block computes them.
SITE_POINTS = ("mlp_in", "mlp_out", "resid_post")


@dataclass(frozen=True)
class Site:
    """A place activations are read: the residual stream after block `layer` (what SAEs
    read), or the input (after the pre-MLP norm) or output (after the post-MLP norm) of that
    block's MLP (what transcoders read and predict). Sites sort in the order the model
    computes them."""

    layer: int
    point: str = "resid_post"

    def __post_init__(self) -> None:
        if self.point not in SITE_POINTS:
            raise ValueError(f"unknown site point {self.point!r}")

    @property
    def order(self) -> tuple[int, int]:
        return self.layer, SITE_POINTS.index(self.point)

    def __lt__(self, other: Site) -> bool:  # type: ignore[override]
        return self.order < other.order

    @property
    def label(self) -> str:
        """How manifests and messages name it: `resid_post.12`, `mlp_in.3`."""
        return f"{self.point}.{self.layer}"

    @classmethod
    def parse(cls, label: str) -> Site:
        point, _, layer = label.rpartition(".")
        return cls(int(layer), point)


@dataclass(frozen=True)
class SaeSpec:
    """One SAE: its architecture, size and sparsity settings. The config's `train.saes` items,
    what the architectures and the optimizer read, and `sae.SaeSpec` in the Python API.
    Several train together on one activation stream (a sweep)."""

    # Names the output directory sae/<name>; empty: derived from the settings below.
    name: str = ""
    architecture: Architecture = "relu"
    # "sae" reconstructs the residual stream after block `layer`. A "transcoder" reads the
    # input of that block's MLP (after its pre-MLP norm) and predicts the MLP's output (after
    # its post-MLP norm, what the block adds to the residual stream), so its latents replace
    # the MLP; a "skip_transcoder" adds a learned affine skip x @ W_skip.T (zero at start).
    # Every architecture can be any kind.
    kind: Kind = "sae"
    layer: int = 2
    # Dictionary width as a multiple of the model's hidden size.
    expansion_factor: int = 8
    # Latents kept per token (topk) or on average per token (batchtopk, matryoshka_batchtopk).
    k: int = 32
    # ReLU: L1 coefficient (SAELens' l1_coefficient); JumpReLU: the coefficient of its sparsity
    # loss (SAELens' l0_coefficient); unused by the top-k kinds. On inputs scaled to mean norm
    # sqrt(d_model); 2.0 gave held-out L0 ~6 for ReLU on the demo model.
    sparsity_coefficient: float = 2.0
    learning_rate: float = 2e-3
    # AuxK (topk, batchtopk): latents per token used to revive dead ones; 0 = d_model / 2.
    k_aux: int = 0
    auxk_coefficient: float = 0.03125
    # JumpReLU: straight-through kernel width and initial threshold (normalised input units).
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.05
    # JumpReLU's sparsity loss, per token, times sparsity_coefficient: "step" is L0 itself
    # (DeepMind); "quadratic" is 2/target_l0 * (L0 - target_l0)^2, pulling L0 to a target from
    # both sides (Gemma Scope 2); "tanh" is sum tanh(jumprelu_tanh_scale * latent * |W_dec row|)
    # (Anthropic). L0's gradient is the straight-through estimate of jumprelu_bandwidth.
    jumprelu_sparsity_loss_mode: JumpReluSparsityLossMode = "step"
    target_l0: float = 0.0
    jumprelu_tanh_scale: float = 4.0
    # JumpReLU: Anthropic's pre-activation loss, which lifts dead latents' pre-activations
    # toward their thresholds: coefficient * sum over dead latents of relu(threshold - pre) *
    # |W_dec row|, averaged over tokens. 0 turns it off (SAELens' None); Anthropic used 3e-6.
    pre_act_loss_coefficient: float = 0.0
    # matryoshka_batchtopk: the nested prefixes' widths in latents, strictly increasing, the last
    # equal to the SAE's width. Each prefix reconstructs the input on its own and the losses
    # add up, so early latents learn general features and later ones refine them.
    matryoshka_widths: tuple[int, ...] = ()
    # matryoshka_batchtopk: AuxK per prefix level, each level's dead latents reconstructing
    # what that level's prefix misses (SAELens' use_matryoshka_aux_loss); else the plain AuxK.
    use_matryoshka_aux_loss: bool = False
    # ReLU: resample dead latents every N steps; 0 turns it off.
    resample_every: int = 0
    # Standardise each token before encoding (SAELens' normalize_activations="layer_norm"):
    # needed by batchtopk and jumprelu when token norms vary (see sae/token_norm.py).
    normalize_tokens: bool = False

    def __post_init__(self) -> None:
        # YAML gives a list; a tuple keeps the spec hashable and immutable.
        object.__setattr__(self, "matryoshka_widths", tuple(self.matryoshka_widths))

    @property
    def input_site(self) -> Site:
        """Where it reads: the residual stream after `layer`, or that block's MLP input."""
        return Site(self.layer, "resid_post" if self.kind == "sae" else "mlp_in")

    @property
    def target_site(self) -> Site | None:
        """What a transcoder predicts (that block's MLP output); None for an SAE."""
        return None if self.kind == "sae" else Site(self.layer, "mlp_out")

    def width(self, d_model: int) -> int:
        """Latents of the dictionary on a model of hidden size `d_model`."""
        return d_model * self.expansion_factor

    def display_name(self) -> str:
        if self.name:
            return self.name
        kind = "" if self.kind == "sae" else f"{self.kind.replace('_', '-')}-"
        return kind + self._architecture_name()

    def _architecture_name(self) -> str:
        size = f"L{self.layer}-x{self.expansion_factor}"
        if self.architecture in ("topk", "batchtopk"):
            return f"{self.architecture}-{size}-k{self.k}"
        if self.architecture == "matryoshka_batchtopk":
            return f"matryoshka-{size}-k{self.k}-levels{len(self.matryoshka_widths)}"
        if self.architecture == "jumprelu" and self.jumprelu_sparsity_loss_mode == "quadratic":
            return f"jumprelu-{size}-l0target{self.target_l0:g}"
        if self.architecture == "jumprelu" and self.jumprelu_sparsity_loss_mode == "tanh":
            return f"jumprelu-tanh-{size}-c{self.sparsity_coefficient:g}"
        return f"{self.architecture}-{size}-c{self.sparsity_coefficient:g}"

    def validate(self, prefix: str) -> None:
        if self.layer < 0:
            raise ConfigError(f"{prefix}.layer must be >= 0, got {self.layer}")
        for key in ("expansion_factor", "k"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{prefix}.{key} must be positive, got {getattr(self, key)}")
        for key in (
            "jumprelu_bandwidth",
            "jumprelu_init_threshold",
            "jumprelu_tanh_scale",
            "learning_rate",
        ):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{prefix}.{key} must be positive, got {getattr(self, key)}")
        for key in (
            "sparsity_coefficient",
            "auxk_coefficient",
            "k_aux",
            "resample_every",
            "target_l0",
            "pre_act_loss_coefficient",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key} must not be negative, got {getattr(self, key)}")
        if self.resample_every and self.architecture != "relu":
            raise ConfigError(
                f"{prefix}.resample_every is for relu SAEs; {self.architecture} SAEs revive "
                "dead latents otherwise (AuxK or the threshold)"
            )
        if self.kind != "sae" and self.normalize_tokens:
            # A transcoder's input is already normalised by the pre-MLP norm, and SAELens
            # would map the output back with the input's statistics.
            raise ConfigError(f"{prefix}.normalize_tokens is for SAEs, not {self.kind}s")
        if self.kind != "sae" and self.resample_every:
            raise ConfigError(f"{prefix}.resample_every is for SAEs, not {self.kind}s")
        self._validate_jumprelu(prefix)
        self._validate_matryoshka(prefix)
        if self.name and not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"{prefix}.name {self.name!r} may hold only letters, digits, - _ .")

    def _validate_jumprelu(self, prefix: str) -> None:
        jumprelu_only = {
            "jumprelu_sparsity_loss_mode": self.jumprelu_sparsity_loss_mode != "step",
            "target_l0": self.target_l0 != 0,
            "pre_act_loss_coefficient": self.pre_act_loss_coefficient != 0,
        }
        for key, is_set in jumprelu_only.items():
            if is_set and self.architecture != "jumprelu":
                raise ConfigError(f"{prefix}.{key} is for jumprelu SAEs, not {self.architecture}")
        quadratic = self.jumprelu_sparsity_loss_mode == "quadratic"
        if quadratic and self.target_l0 <= 0:
            raise ConfigError(
                f"{prefix}: jumprelu_sparsity_loss_mode 'quadratic' needs target_l0 > 0"
            )
        if self.target_l0 and not quadratic:
            raise ConfigError(
                f"{prefix}.target_l0 is read only by jumprelu_sparsity_loss_mode 'quadratic'"
            )

    def _validate_matryoshka(self, prefix: str) -> None:
        widths = self.matryoshka_widths
        if self.architecture != "matryoshka_batchtopk":
            if widths or self.use_matryoshka_aux_loss:
                raise ConfigError(
                    f"{prefix}: matryoshka settings are for matryoshka_batchtopk SAEs, "
                    f"not {self.architecture}"
                )
            return
        if not widths:
            raise ConfigError(f"{prefix}.matryoshka_widths must list the nested widths")
        if widths[0] <= 0 or any(b <= a for a, b in zip(widths, widths[1:], strict=False)):
            raise ConfigError(
                f"{prefix}.matryoshka_widths must be positive and strictly increasing, "
                f"got {list(widths)}"
            )

    def check_against_model(self, prefix: str, d_model: int, model_shards: int) -> None:
        """Checks that need the model's hidden size and the mesh, run before training."""
        d_sae = self.width(d_model)
        widths = self.matryoshka_widths
        if widths and widths[-1] != d_sae:
            raise ConfigError(
                f"{prefix}.matryoshka_widths must end at the SAE's width {d_sae} "
                f"(d_model {d_model} x expansion_factor {self.expansion_factor}), "
                f"got {list(widths)}"
            )
        if self.target_l0 > d_sae:
            raise ConfigError(f"{prefix}.target_l0={self.target_l0:g} exceeds the width {d_sae}")
        if self.architecture in ("topk", "batchtopk", "matryoshka_batchtopk") and self.k > d_sae:
            raise ConfigError(f"{prefix}.k={self.k} is larger than the SAE's width {d_sae}")
        if self.k_aux > d_sae:
            raise ConfigError(f"{prefix}.k_aux={self.k_aux} is larger than the width {d_sae}")
        if d_sae % model_shards:
            raise ConfigError(
                f"{prefix}: width {d_sae} is not divisible by the mesh's model axis "
                f"({model_shards} devices)"
            )
