"""Priority classes and fair queueing in front of a saturated engine (docs/fairness.md)."""
