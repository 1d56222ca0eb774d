"""The webdataset region path under torchrun: 2 CPU processes (gloo) x 2 loader workers on 4 toy shards.

The test starts this file under ``torchrun --nproc_per_node 2``; each rank runs ``clip_ext.train`` and records
the ``__url__#__key__`` of every sample its batches carried. open_clip's own behaviour with
``--dataset-resampled`` off: shards are split by node and by worker, so each epoch every sample is seen
exactly once over all ranks and workers (16 samples, 4 shards of 4, global batch 4: 2 batches per worker).

open_clip 3.3's main wraps the model as ``DistributedDataParallel(model, device_ids=[device])``, which torch
refuses for a CPU module; the rank script drops ``device_ids`` for CPU modules (a GPU run passes them as is).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

N, SHARDS, EPOCHS = 16, 4, 2
BATCHES_PER_RANK = N // (2 * 2)  # per epoch: 16 samples / global batch of 4


@pytest.mark.slow
def test_two_ranks_with_two_workers_see_every_sample_once_per_epoch_and_log_the_region_loss(tmp_path):
    from vlext.toyworld.clip_shards import brace_pattern, write_clip_shards

    shards = write_clip_shards(tmp_path / "wds", N, shards=SHARDS, seed=0, image_size=32)
    env = {**os.environ, "CLIP_EXT_WDS_OUT": str(tmp_path), "CLIP_EXT_WDS_DATA": brace_pattern(shards),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve())]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    everything = sorted(f"{shard}#{i:06d}" for i in range(N) for shard in [shards[i // (N // SHARDS)]])
    for epoch in range(EPOCHS):
        batches = [rank[epoch * BATCHES_PER_RANK : (epoch + 1) * BATCHES_PER_RANK] for rank in seen]
        keys = [key for rank in batches for batch in rank for key in batch]
        assert sorted(keys) == everything, f"epoch {epoch}"  # each sample once, none missing
        shards_of = [{key.split("#")[0] for batch in rank for key in batch} for rank in batches]
        assert not shards_of[0] & shards_of[1]  # split by node: no shard on both ranks
    assert all(len(rank) == EPOCHS * BATCHES_PER_RANK for rank in seen)
    log = (tmp_path / "logs/wds-ddp/out.log").read_text()
    assert log.count("Region_loss: ") == EPOCHS * BATCHES_PER_RANK and "Hard_negative_loss: " in log
    for epoch in range(EPOCHS):  # counts summed over both ranks
        assert f"epoch {epoch}: webdataset regions: {N} samples, 0 without regions" in log


def _rank_main() -> None:
    import torch

    import clip_ext.train as clip_train
    from clip_ext.region_shards import RegionShardLoader

    out = Path(os.environ["CLIP_EXT_WDS_OUT"])
    batches = []
    receive = RegionShardLoader._receive

    def recording(self, images, texts, extras):
        batches.append(list(extras["_keys"]))
        return receive(self, images, texts, extras)

    RegionShardLoader._receive = recording

    class CpuDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module, device_ids=None, **kwargs):
            on_cpu = device_ids and all(torch.device(d).type == "cpu" for d in device_ids)
            super().__init__(module, device_ids=None if on_cpu else device_ids, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuDDP
    torch.set_num_threads(1)
    clip_train.main([
        "--model", "clip-ext-tiny", "--train-data", os.environ["CLIP_EXT_WDS_DATA"], "--dataset-type", "webdataset",
        "--train-num-samples", str(N), "--batch-size", "2", "--workers", "2", "--epochs", str(EPOCHS),
        "--lr", "1e-3", "--warmup", "1", "--device", "cpu", "--precision", "fp32", "--seed", "0",
        "--dist-backend", "gloo", "--region-loss-weight", "0.1", "--hard-negative-weight", "0.5",
        "--log-every-n-steps", "1", "--logs", str(out / "logs"), "--name", "wds-ddp",
    ])  # fmt: skip
    rank = int(os.environ["RANK"])
    (out / f"rank{rank}.json").write_text(json.dumps(batches))


if __name__ == "__main__":
    _rank_main()
