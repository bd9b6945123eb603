"""lit_sahs: safety-head detectors."""
__version__ = "0.1.0"
