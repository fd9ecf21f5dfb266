"""The framework-free core of SPD-SAM (no MONAI Label imports), in four layers:

``runtime`` (backbones, encoders, decoding) <- ``method`` (clicks -> consensus prompts -> 3D mask)
<- ``serving`` (embedding cache, background embedding, published checkpoints) and ``training``
(rounds on saved labels). ``atomic_files`` is the one write-then-rename helper all of them use.
The MONAI Label glue (``lib.configs``, ``lib.infers``, ``lib.trainers``, ``lib.activelearning``,
``lib.datastore``) builds on these packages.
"""
