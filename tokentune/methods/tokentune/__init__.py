"""TokenTune: backprop through a random subset of each sequence's tokens.

- ``method``: the ``tokentune`` method (settings, hooks) and ``select_tokens``;
- ``decoder`` / ``encoder``: the loss of a decoder (causal LM) and of an encoder with the split forward;
- ``split_forward``: a layer's forward with the selected tokens kept apart from the rest.
"""

from tokentune.methods.tokentune import method  # noqa: F401  (registers the method)
