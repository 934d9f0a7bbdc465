"""acestep-ft: fine-tuning ACE-Step 1.5 (LoRA and full) with Hydra and Accelerate."""

__version__ = "0.1.0"
