"""The classifier, its MC-dropout sampling and the learned loss predictor."""
