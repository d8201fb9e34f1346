"""The TPU VM startup script that runs one job in the container on every worker of a slice.

`gemma-sae submit` puts the rendered text in the node's `startup-script` metadata; every
worker runs it as root at boot. The script is jobs/cloud/templates/tpu_startup.sh.tftpl, the same
template Terraform renders with templatefile() (infra/tpu.tf, infra/retrain.tf); its header
documents the variables and what the script does. This module fills them in the way
templatefile() does, so both callers run the same script.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from importlib import resources

from sae.errors import InputError

TEMPLATE = "templates/tpu_startup.sh.tftpl"  # package data of `jobs.cloud`
CONTAINER = "gemma-sae-job"  # the template's CONTAINER: `sudo docker logs -f gemma-sae-job`
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def template_text() -> str:
    return resources.files("jobs.cloud").joinpath(TEMPLATE).read_text()


def variables() -> set[str]:
    return set(_PLACEHOLDER.findall(template_text()))


def substitute(values: dict[str, str]) -> str:
    """What templatefile() makes of the template with these values (one for each variable)."""
    text = template_text()
    missing, unknown = variables() - set(values), set(values) - variables()
    if missing or unknown:
        raise ValueError(f"template variables missing {sorted(missing)}, unknown {sorted(unknown)}")
    for name, value in values.items():
        # Each value sits between single quotes on one line of the script.
        if "'" in value or "\n" in value:
            raise InputError(f"{name}={value!r}: the startup script cannot carry ' or a newline")
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], text)


def render(
    image: str,
    stage: str,
    workdir: str,
    status_uri: str,
    overrides: Sequence[str] = (),
    config: str = "",
    config_yaml: str | None = None,
) -> str:
    """The script for a `gemma-sae submit` attempt.

    `config` is a path in the image or a gs:// URI; `config_yaml` (instead) travels in the
    script. `overrides` are key=value words, then flags such as --force. A stage that exits 75
    is not restarted on the worker (max_runs 1): the exit code goes to `status_uri` at once,
    and submit answers it by requesting a new slice, as it does for a preempted one.
    """
    if config and config_yaml is not None:
        raise ValueError("give config or config_yaml, not both")
    for word in overrides:
        if not word or any(char.isspace() or char == "'" for char in word):
            raise InputError(
                f"override {word!r} cannot run on a TPU: the startup script takes words "
                "without spaces or single quotes"
            )
    encoded = "" if config_yaml is None else base64.b64encode(config_yaml.encode()).decode()
    return substitute(
        {
            "image": image,
            "stage": stage,
            "config": config,
            "config_base64": encoded,
            "overrides": " ".join(overrides),
            "workdir": workdir,
            "status_uri": status_uri.rstrip("/"),
            "max_runs": "1",
        }
    )
