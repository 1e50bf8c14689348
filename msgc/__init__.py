"""msgc: Middle Spectrum Grouped Convolution on PyTorch."""
__version__ = "0.1.0"
