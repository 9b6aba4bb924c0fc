"""Running beyond one device on torch.distributed: tensor parallelism (tp.py)."""
