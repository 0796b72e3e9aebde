"""Image–OSM pair datasets for pretraining: storage, loading and joint augmentation."""
