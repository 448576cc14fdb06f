"""Reports of the baselines and of a run: ``results`` (one results model), ``markdown`` (the
Markdown report and README table), ``plots`` (PNG, matplotlib) and ``terminal`` (live progress
and the end-of-session summary)."""
