"""What a real run needs around the core: the recipe and its settings, one iteration's
stages (iteration.py), pairs and rows, Hugging Face folders in and out (checkpoint,
config, tokenizer, chat templates), the training loop under FSDP with its checkpoints
(trainer.py, distributed.py), the run folder's layout and lock, errors and reporting.
It imports the core; the core never imports it."""
