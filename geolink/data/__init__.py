"""Image–OSM pair data for pretraining: the sharded pair format and make-pairs (``shards``), pair datasets and
batching (``pairs``), joint image + graph augmentation (``transforms``), folder datasets (``folders``)."""
