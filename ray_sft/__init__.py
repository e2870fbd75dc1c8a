"""QLoRA supervised fine-tuning, hyperparameter search and adapter serving on Ray."""

__version__ = "0.1.0"
