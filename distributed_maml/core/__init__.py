"""The mathematics: models, the MAML functions (inner loop, meta-gradient and the variants), the
one network builder, the learner (flat weights + Adam) and what crosses from workers to it.
Ray-free and run-folder-free; imports only `data` (a model is sized from the store) and the base."""
