"""What every rank of a run must agree on: one place for the collectives our hooks and the
multi-head segmentor need (nccl reduces CUDA tensors only; gloo CPU ones)."""
import torch
import torch.distributed as dist


def distributed():
    """More than one rank in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_values(values, op):
    """``values`` (floats) combined over the ranks with ``op`` (``dist.ReduceOp.MAX``: any rank
    says so; ``MIN``: every rank does), as a list; alone, the values themselves."""
    tensor = torch.tensor([float(v) for v in values])
    if distributed():
        if dist.get_backend() == 'nccl':
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def from_rank0(obj):
    """Rank 0's ``obj`` on every rank (a picklable object); alone, ``obj`` itself."""
    if distributed():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj
