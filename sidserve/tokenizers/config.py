"""What every tokenizer's config shares: the behavior modality's name, reading a config from a
dict (an unknown key is an error naming it, so a typo in a YAML file never silently falls
back to a default) and the input description (``ModalityInputs``).

ADC-SID's config is ``sidserve/tokenizers/adc_sid/config.py``; each baseline's lives with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

BEHAVIOR = "behavior"


def config_from_dict(cls, data: dict[str, Any]):
    """Build dataclass ``cls`` from a dict; unknown keys are an error naming them."""
    if not isinstance(data, dict):
        raise ValueError(f"config must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
    data = dict(data)
    if "modality_dims" in data:
        if not isinstance(data["modality_dims"], dict):
            raise ValueError(f"modality_dims must be a mapping, got {data['modality_dims']!r}")
        data["modality_dims"] = {str(k): v for k, v in data["modality_dims"].items()}
    return cls(**data).validate()


class ModalityInputs:
    """What every tokenizer config says about its inputs, from its ``modality_dims`` and
    ``behavior_dim`` fields (ADC-SID's and the baselines' configs share it)."""

    modality_dims: dict[str, int]
    behavior_dim: int | None

    @property
    def content_modalities(self) -> list[str]:
        return list(self.modality_dims)

    @property
    def has_behavior(self) -> bool:
        return self.behavior_dim is not None
