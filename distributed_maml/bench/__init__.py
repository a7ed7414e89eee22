"""`distributed-maml bench`: the benchmarks of the meta-step and of evaluation (the method table
against the usual implementations, conv4 speed and memory, the paper's mini-ImageNet step,
precisions, evaluation against training). cli/bench.py parses the command and dispatches here."""
