"""The SAM-SP engine proper: volumes and their canonical slice view, preprocessing, the two SAM-SP
passes, clicks, and the predictor that keeps a model warm with its embedding cache."""
