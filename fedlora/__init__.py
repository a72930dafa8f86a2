"""fedlora: federated LoRA fine-tuning on Flower, peft and opacus."""

__version__ = "0.1.0"
