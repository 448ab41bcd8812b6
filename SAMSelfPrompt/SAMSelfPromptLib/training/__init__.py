"""SAM-SP training: data loaders, the embedding cache, the loss, the trainer and few-shot adaptation.

Nothing here is imported by the inference path; hosts import it only to train or evaluate.
"""
