from ssl_vit.callbacks.checkpoint import LastCheckpoint
from ssl_vit.callbacks.collapse import CollapseMonitor
from ssl_vit.callbacks.knn import KNNMonitor

__all__ = ["CollapseMonitor", "KNNMonitor", "LastCheckpoint"]
