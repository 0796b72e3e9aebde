"""geolink: the GeoLink remote-sensing foundation model (image + OpenStreetMap) as a model zoo.

Public API::

    import geolink
    model = geolink.create_model("geolink_vit_large_patch16_224", component="fusion")
    geolink.list_models(), geolink.list_pretrained()
"""

__version__ = "0.1.0"

from geolink.models import (  # noqa: E402
    GeoLinkForPretraining,
    GeoLinkFusionEncoder,
    GeoLinkImageEncoder,
    GeoLinkOSMEncoder,
)
from geolink.registry import (  # noqa: E402
    PretrainedTag,
    create_model,
    get_model_config,
    get_pretrained_tag,
    list_models,
    list_pretrained,
    load_model,
    register_pretrained,
)

__all__ = [
    "GeoLinkForPretraining",
    "GeoLinkFusionEncoder",
    "GeoLinkImageEncoder",
    "GeoLinkOSMEncoder",
    "PretrainedTag",
    "create_model",
    "get_model_config",
    "get_pretrained_tag",
    "list_models",
    "list_pretrained",
    "load_model",
    "register_pretrained",
]
