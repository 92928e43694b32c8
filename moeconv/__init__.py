"""moeconv: turn a dense Hugging Face causal LM into a sparse Mixture-of-Experts model, compress it, and measure the trade."""

__version__ = "0.1.0"
