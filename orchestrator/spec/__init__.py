"""What a sweep is, before anything runs (never imports ray): a YAML file -> a validated ``SweepSpec``.

- ``sweep``: ``SweepSpec`` and ``load_spec`` (includes, ``--set`` overrides, parsing);
- ``parts``: the spec's sections, ``SearchDim`` and ``SpecError``;
- ``validate``: every key, grid value and range bound built into a run config; the methods' shape checks;
- ``inputs``: the model, data files, template and eval tasks exist on this machine;
- ``plan``: the dry run (trials, resources, memory estimates).
"""
