"""Preprocessing: an audio folder with captions -> a v3 dataset, with the frozen VAE, text encoder and condition
encoder of the official ACE-Step 1.5 chain (`scripts/preprocess.py`). Imports `model/` and `data/`; nothing in
`data/` or `train/` imports it.
"""

from .pipeline import Summary, preprocess

__all__ = ["Summary", "preprocess"]
