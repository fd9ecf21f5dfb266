"""What a long-running server needs around the method: the embedding cache (memory + bounded disk), the
background embedder, published checkpoints and the reloader that switches the served model to the newest one.
"""

from .background import BackgroundEmbedder
from .checkpoints import CheckpointError, CheckpointStore
from .embedding_cache import EmbeddingCache
from .model_reloader import ModelReloader

__all__ = ["BackgroundEmbedder", "CheckpointError", "CheckpointStore", "EmbeddingCache", "ModelReloader"]
