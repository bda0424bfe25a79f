"""The train stage: the model, the step-loop trainer, its run folder, checkpoints and bookkeeping."""
