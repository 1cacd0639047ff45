"""Anomaly type discovery: group detected defects into types without labels (after AnomalyNCD).

``discover(results, k=None)`` binarises each anomaly map into regions, describes each region with a
frozen backbone (mask-weighted pooling over a context crop), pools an image's regions into one
descriptor (weighted by area) and clusters the images into defect types, each with a confidence.
Works on the results of any scorer.
"""

from __future__ import annotations

from anomaly.discovery.cluster import Clusters, cluster_descriptors, pool_by_image
from anomaly.discovery.describe import RegionDescriber
from anomaly.discovery.pipeline import DiscoveryResult, discover
from anomaly.discovery.regions import Binarization, Region, find_regions, regions_from_mask

__all__ = [
    "Binarization",
    "Clusters",
    "DiscoveryResult",
    "Region",
    "RegionDescriber",
    "cluster_descriptors",
    "discover",
    "find_regions",
    "pool_by_image",
    "regions_from_mask",
]
