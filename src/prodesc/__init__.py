"""prodesc: product titles in, product descriptions out — fine-tuned, measured, served."""

__version__ = "0.1.0"
