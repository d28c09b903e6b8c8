"""Efficient architectures and the model registry (``create_model(name, **kwargs)``)."""
from lightning_eff.models import mobilenet  # noqa: F401  (registers the MobileNet family)
from lightning_eff.models.registry import create_model, list_models, model_signature, register_model

__all__ = ["create_model", "list_models", "model_signature", "register_model"]
