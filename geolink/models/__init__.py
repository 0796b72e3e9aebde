"""GeoLink models: image, OSM and fusion encoders, the pretraining model and downstream heads."""

from geolink.models.fusion import GeoLinkFusionEncoder
from geolink.models.image import GeoLinkImageEncoder
from geolink.models.osm import GeoLinkOSMEncoder
from geolink.models.pretrain import GeoLinkForPretraining

__all__ = ["GeoLinkFusionEncoder", "GeoLinkImageEncoder", "GeoLinkOSMEncoder", "GeoLinkForPretraining"]
