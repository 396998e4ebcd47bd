"""dints3d: neural architecture search for segmentation on MONAI (DiNTS, Auto-DeepLab, DPC)."""

__version__ = "0.1.0"
