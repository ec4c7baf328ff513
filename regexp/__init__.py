"""regexp: a command-line experiment runner for training-dynamics studies."""

__version__ = "0.1.0"
