"""Learning techniques: distillation, augmentation, classical baselines."""
