"""What a sweep is, before anything runs (never imports ray): a YAML file -> a validated ``SweepSpec``.

- ``sweep``: the frozen ``SweepSpec`` and ``load_spec`` (includes, ``--set`` overrides, parsing);
- ``sections``: the settings sections (objective, tune, after_trial, tracking), ``setting(default, help)``
  dataclasses checked when built;
- ``parts``: ``SearchDim`` and ``SpecError``;
- ``validate``: cross-section checks; every key, grid value and range bound built into a run config; the
  methods' shape checks;
- ``inputs``: the model, data files, template and eval tasks exist on this machine;
- ``plan``: the dry run (trials, resources, memory estimates).
"""
