"""Training: optimizer groups, the train state, pure train steps for both stages, and the host loop."""
