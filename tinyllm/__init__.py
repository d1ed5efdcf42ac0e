"""tinyllm: a language model built from first principles on the `autograd` engine."""

__version__ = "0.1.0"
