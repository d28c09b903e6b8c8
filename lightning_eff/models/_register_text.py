"""Import the efficient-architecture modules so their models register themselves.

``lightning_eff.models`` imports this module; it registers ``pqrnn``, ``pqrnn_tiny``,
``prado``, ``prado_tiny``, ``lstm``, ``bert_teacher``, ``bert_tiny``, ``bert_student`` and ``plain_cnn``.
"""
from lightning_eff.models import baselines, bert_student, conv_cost, pqrnn, prado  # noqa: F401

__all__: list[str] = []
