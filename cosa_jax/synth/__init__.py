"""Host-side CoSAlign data synthesis over any OpenAI-compatible endpoint (no JAX).

The endpoint client and journal are ``cosa_jax.endpoint``, the judges ``cosa_jax.judges``.
Modules (import the one you need; this package imports nothing heavy on its own):
- ``scoring``  ``error_score`` (spec §4.5);  ``pairing``  ``make_pairs`` (spec §4.6)
- ``inputs``   prompt sources (shipped mini set, local files, hub presets), dedupe, test overlap
- ``stages``   the six stages of Algorithm 1 over ``datasets`` directories
"""
