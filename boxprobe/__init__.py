"""boxprobe: entity tracking interpretability."""
__version__ = "0.1.0"
