"""Evaluation tables: prompt-free rows against the vanilla and expert-box rows, and click curves."""
