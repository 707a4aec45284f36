"""What a training run is made of: the session it builds (device, data, model, weights, optimizer, DDP, loss,
EMA), the step and the epoch loop, evaluation per exit, checkpoints, and the configuration a command
resolves from a checkpoint, a file and its flags."""
