"""Training the project's small synthetic-set detectors (targets, losses, the loop)."""
