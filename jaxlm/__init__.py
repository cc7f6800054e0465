"""jaxlm: train dense and Mixture-of-Experts transformer LMs with JAX and Flax NNX."""

__version__ = "0.1.0"
