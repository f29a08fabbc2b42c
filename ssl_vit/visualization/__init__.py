"""Pictures of what a backbone sees: [CLS] attention maps per head and PCA of patch features."""
from ssl_vit.visualization.attention import cls_attention_maps
from ssl_vit.visualization.pca import foreground_iou, joint_pca, pca_foreground
from ssl_vit.visualization.render import attention_picture, pca_picture

__all__ = ["attention_picture", "cls_attention_maps", "foreground_iou", "joint_pca", "pca_foreground",
           "pca_picture"]
