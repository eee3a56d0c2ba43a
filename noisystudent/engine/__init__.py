"""The training engine (layer 4): device, seeds, mixed precision, optimizers, the one training
loop every stage uses, evaluation, and the torchrun/DDP helpers. It knows models and data, not
stages: a teacher and a student differ only in the batches they are given."""
