"""Data layer: image decoding, dataset loaders (MVTec AD, VisA, folders) and synthetic datasets."""

from __future__ import annotations

from anomaly.data.datasets import (
    CategoryData,
    Sample,
    find_categories,
    is_category_root,
    load_folder,
    load_ground_truth,
    load_mvtec,
    load_visa,
)
from anomaly.data.io import (
    IMAGE_SUFFIXES,
    is_image_file,
    list_images,
    read_image,
    read_image_size,
    read_images,
    read_mask,
)
from anomaly.data.synthetic import DEFECT_TYPES, make_synthetic_category

__all__ = [
    "DEFECT_TYPES",
    "IMAGE_SUFFIXES",
    "CategoryData",
    "Sample",
    "find_categories",
    "is_category_root",
    "is_image_file",
    "list_images",
    "load_folder",
    "load_ground_truth",
    "load_mvtec",
    "load_visa",
    "make_synthetic_category",
    "read_image",
    "read_image_size",
    "read_images",
    "read_mask",
]
