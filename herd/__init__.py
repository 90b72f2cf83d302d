"""herd: the Llama family of language models, end to end."""

__version__ = "0.1.0"
