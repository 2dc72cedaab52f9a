"""Model builders and model files with their metadata."""
