"""The settings of one SAE, shared by the config (`train.saes`), the architectures, the
optimizer and the Python API: the one place they are declared."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sae.errors import ConfigError


@dataclass(frozen=True)
class SaeSpec:
    """One SAE: its architecture, size and sparsity settings. The config's `train.saes` items,
    what the architectures and the optimizer read, and `sae.SaeSpec` in the Python API.
    Several train together on one activation stream (a sweep)."""

    # Names the output directory sae/<name>; empty: derived from the settings below.
    name: str = ""
    architecture: Literal["relu", "topk", "batchtopk", "jumprelu"] = "relu"
    layer: int = 2
    # Dictionary width as a multiple of the model's hidden size.
    expansion_factor: int = 8
    # Latents kept per token (topk) or on average per token (batchtopk).
    k: int = 32
    # ReLU: L1 coefficient; JumpReLU: L0 coefficient; unused by topk and batchtopk. On inputs
    # scaled to mean norm sqrt(d_model); 2.0 gave held-out L0 ~6 for ReLU on the demo model.
    sparsity_coefficient: float = 2.0
    learning_rate: float = 2e-3
    # AuxK (topk, batchtopk): latents per token used to revive dead ones; 0 = d_model / 2.
    k_aux: int = 0
    auxk_coefficient: float = 0.03125
    # JumpReLU: straight-through kernel width and initial threshold (normalised input units).
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.05
    # ReLU: resample dead latents every N steps; 0 turns it off.
    resample_every: int = 0
    # Standardise each token before encoding (SAELens' normalize_activations="layer_norm"):
    # needed by batchtopk and jumprelu when token norms vary (see sae/token_norm.py).
    normalize_tokens: bool = False

    def width(self, d_model: int) -> int:
        """Latents of the dictionary on a model of hidden size `d_model`."""
        return d_model * self.expansion_factor

    def display_name(self) -> str:
        if self.name:
            return self.name
        size = f"L{self.layer}-x{self.expansion_factor}"
        if self.architecture in ("topk", "batchtopk"):
            return f"{self.architecture}-{size}-k{self.k}"
        return f"{self.architecture}-{size}-c{self.sparsity_coefficient:g}"

    def validate(self, prefix: str) -> None:
        if self.layer < 0:
            raise ConfigError(f"{prefix}.layer must be >= 0, got {self.layer}")
        for key in ("expansion_factor", "k"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{prefix}.{key} must be positive, got {getattr(self, key)}")
        for key in ("jumprelu_bandwidth", "jumprelu_init_threshold", "learning_rate"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{prefix}.{key} must be positive, got {getattr(self, key)}")
        for key in ("sparsity_coefficient", "auxk_coefficient", "k_aux", "resample_every"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key} must not be negative, got {getattr(self, key)}")
        if self.resample_every and self.architecture != "relu":
            raise ConfigError(
                f"{prefix}.resample_every is for relu SAEs; {self.architecture} SAEs revive "
                "dead latents otherwise (AuxK or the threshold)"
            )
        if self.name and not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"{prefix}.name {self.name!r} may hold only letters, digits, - _ .")

    def check_against_model(self, prefix: str, d_model: int, model_shards: int) -> None:
        """Checks that need the model's hidden size and the mesh, run before training."""
        d_sae = self.width(d_model)
        if self.architecture in ("topk", "batchtopk") and self.k > d_sae:
            raise ConfigError(f"{prefix}.k={self.k} is larger than the SAE's width {d_sae}")
        if self.k_aux > d_sae:
            raise ConfigError(f"{prefix}.k_aux={self.k_aux} is larger than the width {d_sae}")
        if d_sae % model_shards:
            raise ConfigError(
                f"{prefix}: width {d_sae} is not divisible by the mesh's model axis "
                f"({model_shards} devices)"
            )
