"""Model families behind one interface (`interface.DiffusionLM`); shared building blocks (layers, rope, decoder)."""
