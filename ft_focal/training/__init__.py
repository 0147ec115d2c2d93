"""The training app: the Trainer (trainer.py) and the parts it holds.

parts.py (`build_run(recipe) -> RunParts`: accelerator, data, model, loss, optimizer, schedule;
the Trainer holds these and its state), state.py (TrainState, best model), log.py (train_log.jsonl,
progress), builders.py (recipe -> model, loss, optimizer, schedule), checkpoint.py (atomic, verified checkpoints), run_control.py
(signals, resume checks), preflight.py, zero_shot.py, sampling.py (resumable batches, sharded
evaluation order), accelerator.py, malloc.py, and FSDP2: sharding.py (fully_shard per block) and
fsdp.py (the Trainer's sharded setup and checkpoints). It imports the library (ft_focal.optim,
losses, metrics, models, data, config), never ft_focal.commands.
"""
