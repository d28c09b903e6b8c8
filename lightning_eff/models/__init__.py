"""Efficient architectures and the model registry (``create_model(name, **kwargs)``).

Registered: MobileNetV2/V3 (timm, width knob, small-input stem), ``plain_cnn`` (the same network
with standard convolutions, for the depthwise-separable comparison), PQRNN / PRADO projection
models, an LSTM baseline and BERT teachers.
"""
from lightning_eff.models import _register_text, mobilenet  # noqa: F401  (registration side effects)
from lightning_eff.models.registry import (
    create_model,
    list_models,
    model_signature,
    register_model,
)

__all__ = ["create_model", "list_models", "model_signature", "register_model"]
