"""Jobs that outlive the kernel: the queue, the worker, staged pipelines, recovery policies.

The engine side of `mmnb.launch` (processes) and `mmnb.events` (the live event stream): no
IPython below this package either. Modules: `control` (commands to a training process through
files), `session` (what every training session publishes), `recovery` (anomaly rollback and
replay), `queue` (the SQLite job queue), `worker` (runs queued jobs), `pipeline` (TOML stages),
`watch` (progress of runs and jobs from their streams), `attach` (a live listener fed from a
stream in another process). See docs/jobs.md.
"""
