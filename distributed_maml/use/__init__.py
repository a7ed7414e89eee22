"""Using a run: the meta-model and its adaptation, open_run, export/load, a user's task files, the served adaptation."""
