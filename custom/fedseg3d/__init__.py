"""fedseg3d: federated 3D medical image segmentation on NVIDIA FLARE with MONAI.

Only ``fedseg3d.learners``, ``fedseg3d.filters`` and ``fedseg3d.server`` import ``nvflare``; everything else is plain
PyTorch/MONAI so it can be unit-tested and reused without a federation.
"""

__version__ = "0.1.0"
