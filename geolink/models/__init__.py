"""GeoLink models: image, OSM and fusion encoders, the pretraining model and downstream heads; the four components
by name (``Component``, also the sections of an architecture JSON) and the extraction of one from a larger model."""

from __future__ import annotations

from enum import Enum

from torch import nn

from geolink.models.fusion import GeoLinkFusionEncoder
from geolink.models.heads import (
    FusionSegmenter,
    ImageClassifier,
    ImageSegmenter,
    LinearClassifier,
    MultiScaleNeck,
    SiameseChangeDetector,
    UPerNetHead,
)
from geolink.models.image import GeoLinkImageEncoder
from geolink.models.osm import GeoLinkOSMEncoder
from geolink.models.pretrain import GeoLinkForPretraining


class Component(str, Enum):
    """A model component; its value is also the name of its section in an architecture JSON."""

    PRETRAINING = "pretraining"
    FUSION = "fusion"
    IMAGE = "image"
    OSM = "osm"


#: component name -> class, in the order of the sections of an architecture JSON
COMPONENTS: dict[str, type[nn.Module]] = {
    "image": GeoLinkImageEncoder,
    "osm": GeoLinkOSMEncoder,
    "fusion": GeoLinkFusionEncoder,
    "pretraining": GeoLinkForPretraining,
}


def extract_component(model: nn.Module, component: str) -> nn.Module | None:
    """The ``component`` sub-model of a pretraining or fusion model (None when it has none)."""
    fusion = model.fusion_encoder if isinstance(model, GeoLinkForPretraining) else model
    if not isinstance(fusion, GeoLinkFusionEncoder):
        return None
    return {"fusion": fusion, "image": fusion.image_encoder, "osm": fusion.osm_encoder}.get(component)


__all__ = [
    "COMPONENTS",
    "Component",
    "FusionSegmenter",
    "GeoLinkForPretraining",
    "GeoLinkFusionEncoder",
    "GeoLinkImageEncoder",
    "GeoLinkOSMEncoder",
    "ImageClassifier",
    "ImageSegmenter",
    "LinearClassifier",
    "MultiScaleNeck",
    "SiameseChangeDetector",
    "UPerNetHead",
    "extract_component",
]
