"""How a sweep runs on Ray: Tune over trial drivers, each a Ray Train job, then merge + eval.

- ``tuner`` + ``space``: the Ray Tune search (grid/random/Optuna, FIFO/ASHA, restore);
- ``trial``: one Tune trial's driver function (train, then merge + eval, then its record);
- ``slots``: training slots, so the next trial trains while one merges;
- ``train_driver`` / ``train_worker``: the Ray Train job and what runs in each of its workers;
- ``post_trial``: merge the adapter and run lm-eval (a warm worker per sweep, or a Ray task);
- ``ray_cluster``: starting or joining Ray, the workers' environment, orphaned placement groups;
- ``storage_sync``: trial folders through a URI storage (s3://, gs://).
"""
