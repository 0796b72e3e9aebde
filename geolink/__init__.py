"""geolink: the GeoLink remote-sensing foundation model (image + OpenStreetMap) as a model zoo."""

__version__ = "0.1.0"
