"""Weights on disk: the SAM-SP checkpoint format, the catalogue of shipped models, consented downloads."""
