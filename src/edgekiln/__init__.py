"""edgekiln: take a trained neural network to edge devices."""

__version__ = "0.1.0"
