"""geolink: the GeoLink remote-sensing foundation model (image + OpenStreetMap) as a model zoo.

Public API (imported on first use, so ``import geolink`` and ``geolink --help`` stay fast)::

    import geolink
    model = geolink.create_model("geolink_vit_large_patch16_224", component="fusion")
    model = geolink.create_model("geolink_tiny", osm={"text_dim": 512})     # overrides: section dicts
    geolink.list_models(), geolink.list_pretrained()
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__version__ = "0.1.0"

# torch_geometric calls torch.jit.script at import, which torch deprecates: noise that is not the user's business
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
                        module=r"torch\.jit\._script")

_EXPORTS = {
    "GeoLinkForPretraining": "geolink.models",
    "GeoLinkFusionEncoder": "geolink.models",
    "GeoLinkImageEncoder": "geolink.models",
    "GeoLinkOSMEncoder": "geolink.models",
    "PretrainedTag": "geolink.registry",
    "create_model": "geolink.registry",
    "get_model_config": "geolink.registry",
    "get_pretrained_tag": "geolink.registry",
    "list_models": "geolink.registry",
    "list_pretrained": "geolink.registry",
    "load_model": "geolink.registry",
    "nest_overrides": "geolink.registry",
    "register_pretrained": "geolink.registry",
    "tag_encoder_for": "geolink.registry",
    "Preprocess": "geolink.data.transforms",
    "create_model_and_transforms": "geolink.registry",
    "resolve_data_config": "geolink.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'geolink' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
