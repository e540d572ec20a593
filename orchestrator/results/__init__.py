"""What a sweep leaves: its files, its MLflow runs and what the console shows.

- ``types``: ``TrialResult`` and ``SweepResult`` (what ``run_sweep`` returns);
- ``trial_status``: each trial's ``status.json`` and ``events.jsonl``;
- ``tracking``: MLflow, a parent run per sweep and a child per trial; ``tracking_queue``: the driver's
  writes off Tune's event loop; ``tracking_journal``: writes that could not be sent, sent on --resume;
- ``report``: the results table, results.csv/json and the Pareto plot; ``highlights``: what is shown of
  it at any number of trials (the top rows and the front, the count of the rest);
- ``mlflow_ui``: the compare view's URL and the parent run's description;
- ``console``: progress lines and the sweep's last lines.
"""

import os

# MLflow 3 sends usage data from a thread in every process that imports it (an exception from that thread
# once failed trial processes): off in every process that imports this package, before it imports mlflow;
# Ray's workers get it from the driver (orchestrator.run.ray_cluster.PROPAGATED_ENV).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
