"""What every layer shares and nothing else: the model config, the vision layout, batch constants, storage paths."""
