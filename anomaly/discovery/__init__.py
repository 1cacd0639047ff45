"""Anomaly type discovery: group detected defects into types without labels (after AnomalyNCD).

``discover(results, k=None)`` binarises each anomaly map into regions (MEBin-style), describes each
region with a frozen backbone (mask-weighted pooling over a context crop), clusters the regions and
merges them into one defect type per image, with a confidence. Works on the results of any scorer.
"""

from __future__ import annotations

from anomaly.discovery.cluster import RegionClusters, cluster_regions, merge_to_images
from anomaly.discovery.describe import RegionDescriber
from anomaly.discovery.pipeline import DiscoveryResult, discover
from anomaly.discovery.regions import Binarization, Region, find_regions, regions_from_mask

__all__ = [
    "Binarization",
    "DiscoveryResult",
    "Region",
    "RegionClusters",
    "RegionDescriber",
    "cluster_regions",
    "discover",
    "find_regions",
    "merge_to_images",
    "regions_from_mask",
]
