from ssl_vit.callbacks.checkpoint import LastCheckpoint
from ssl_vit.callbacks.collapse import CollapseMonitor
from ssl_vit.callbacks.knn import KNNMonitor
from ssl_vit.callbacks.step_seeds import StepSeeds

__all__ = ["CollapseMonitor", "KNNMonitor", "LastCheckpoint", "StepSeeds"]
