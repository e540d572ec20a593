"""IST (importance-aware sparse tuning) and RST (its uniform-random baseline): per step, only a sampled
budget of layers trains.

- ``method``: the ``ist`` and ``rst`` methods (settings, hooks, probes);
- ``layer_sampling``: the pure sampling of the step's layers from their scores;
- ``sparse_layers``: freezing and skipping the layers that do not train this step.
"""

from tokentune.methods.ist import method  # noqa: F401  (registers the methods)
