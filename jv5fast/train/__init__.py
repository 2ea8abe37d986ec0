"""Training for jina-embeddings-v5-text students (model-spec §9): ``TrainConfig`` / ``Trainer`` for stage 1
(embedding distillation) and stage 2 (task adapters), ``TrainModel``, and the losses of both stages.

``from jv5fast.train import losses`` gives ``distill_loss``, ``info_nce_loss``,
``bidirectional_info_nce_loss``, ``gor_loss``, ``cosent_loss`` and ``relational_kd_loss``, each beside the
plain-PyTorch ``*_ref`` it is tested against.
"""
from . import losses
from .model import TrainModel
from .trainer import TrainConfig, Trainer

__all__ = ["losses", "TrainConfig", "Trainer", "TrainModel"]
