"""The command line: the argument parsing of every subcommand (main: train, eval, plot, tune, bench;
tasks; use: adapt, export, serve), a thin layer over the rooms below it and the API."""
