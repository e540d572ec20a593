"""What a sweep leaves: its files, its MLflow runs and what the console shows.

- ``types``: ``TrialResult`` and ``SweepResult`` (what ``run_sweep`` returns);
- ``trial_status``: each trial's ``status.json`` and ``events.jsonl``;
- ``tracking``: MLflow, a parent run per sweep and a child per trial;
- ``report``: the results table, results.csv/json and the Pareto plot;
- ``mlflow_ui``: the compare view's URL and the parent run's description;
- ``console``: progress lines and the sweep's last lines.
"""
