"""Run a function on several CPU processes joined by gloo: the DDP tests of every family."""
import os

import torch
import torch.multiprocessing as mp


def run(fn, world: int, tmp_path):
    """``fn(rank, world)`` on ``world`` processes in one gloo group; returns rank 0's result.
    ``fn`` may use collectives; it must be a module-level function (it is pickled)."""
    out_path = tmp_path / "gloo_result.pt"
    mp.spawn(_worker, args=(fn, world, str(tmp_path / "gloo_init"), str(out_path)),
             nprocs=world, join=True)
    return torch.load(out_path)


def _worker(rank, fn, world, init_file, out_path):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    result = fn(rank, world)
    if rank == 0:
        torch.save(result, out_path)
    # Every rank is done with its collectives before any tears gloo down (a rank closing its
    # pairs while a peer still uses them can abort the peer at exit).
    dist.barrier()
    dist.destroy_process_group()
    # Then leave without running C++ static destructors: a gloo thread still joinable there
    # aborts the process ("terminate called without an active exception", SIGABRT), seen
    # once in a clean-clone CI run after every result was saved.
    os._exit(0)
