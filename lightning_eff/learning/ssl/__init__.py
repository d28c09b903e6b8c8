"""Self-supervised pretraining (survey §3.2.3): SimCLR views and NT-Xent, rotation prediction, the kNN
probe (:mod:`.contrastive`), and BERT's masked-language-model masking and head (:mod:`.mlm`)."""
from lightning_eff.learning.ssl.contrastive import (
    SimCLRViews,
    embed,
    knn_predict,
    nt_xent,
    projection_head,
    rotate_batch,
)
from lightning_eff.learning.ssl.mlm import (
    IGNORE_INDEX,
    build_mlm_head,
    mask_tokens,
    mlm_logits,
    tie_mlm_head,
)

__all__ = ["IGNORE_INDEX", "SimCLRViews", "build_mlm_head", "embed", "knn_predict", "mask_tokens", "mlm_logits",
           "nt_xent", "projection_head", "rotate_batch", "tie_mlm_head"]
