"""omnigen2-batch: batch content production with OmniGen2."""
__version__ = "0.1.0"
