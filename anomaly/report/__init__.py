"""HTML report of scored images: gallery, threshold slider, score histograms, PIMO/AUPIMO and clusters."""

from anomaly.report.build import build_report

__all__ = ["build_report"]
