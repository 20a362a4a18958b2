"""napo: noise-aware preference optimization against modality bias in vision- and audio-language models."""

from napo.objectives import OBJECTIVES, adaptive_q, dynamic_weights, napo_loss

__all__ = ["OBJECTIVES", "NaPOConfig", "NaPOTrainer", "adaptive_q", "dynamic_weights", "napo_loss"]


def __getattr__(name: str):
    # The trainer pulls in trl and transformers (seconds to import): load it only when asked for, so that
    # `import napo` for the loss math or `perturb`-only work stays light.
    if name == "NaPOConfig":
        from napo.config import NaPOConfig

        return NaPOConfig
    if name == "NaPOTrainer":
        from napo.trainer import NaPOTrainer

        return NaPOTrainer
    raise AttributeError(f"module 'napo' has no attribute {name!r}")
