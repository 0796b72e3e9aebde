"""GeoLink models: image, OSM and fusion encoders, the pretraining model and downstream heads."""

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

__all__ = [
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
]
