"""jaxlm: train dense and Mixture-of-Experts transformer LMs with JAX and Flax NNX."""

__version__ = "0.1.0"

from jaxlm.parallel.backends import skip_absent_tpu

# importing jaxlm usually comes before JAX starts a backend (the CLI, a notebook, a script)
skip_absent_tpu()
