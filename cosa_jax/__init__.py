"""cosa-jax: Controllable Safety Alignment (CoSA / CoSAlign) in JAX and Flax.

Importing the package imports no JAX: the host-side modules (``cosa_jax.endpoint``,
``cosa_jax.judges``, ``cosa_jax.synth``, ``cosa_jax.taxonomy``, ``cosa_jax.safety_configs``,
``cosa_jax.eval.metrics``) run on machines without an accelerator stack.
"""

__version__ = "0.1.0"
