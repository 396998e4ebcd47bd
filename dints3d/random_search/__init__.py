"""Random search: DPC cells on cached backbone features, and random DiNTS baselines (``dints3d random-search``)."""
