"""Tensor parallelism across processes: one model split over N devices of a host (torch.distributed: NCCL on
GPUs, gloo on CPUs).

The engine process is rank 0, the driver: it keeps the scheduler, the KV block manager and the sampler, and
starts N - 1 worker processes (spawned, one per device). Each step the driver broadcasts the step's forward
inputs (model_runner.ForwardInputs, or a steps.DecodeStep / steps.MixedStep replayed from CUDA graphs) to the
workers, every rank runs its shard of the model (serval.layers.parallel: two all-reduces a layer, the logits gathered
to rank 0), and the driver samples from them.

    group.py     process group setup, the checks at start (devices, heads), the rendezvous
    weights.py   each rank reads only its slice of a safetensors checkpoint (safe_open's get_slice)
    quant_shards.py  the slices of a quantized checkpoint's own tensors (packed words, group scales, g_idx)
    gguf_shards.py   the slices of a GGUF's blocks (rows, or input columns at block boundaries)
    worker.py    a worker process: its shard, its KV pool, the step loop
    steps.py     the steps every rank runs alike: eager or the same CUDA graph (decode, mixed prefill/decode), ids
                 from the driver's device
    executor.py  the driver: starts and watches the workers, broadcasts each step, shuts them down
"""
from __future__ import annotations


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker died, hung past the collective timeout, or failed a step: the model cannot run
    any more, so the engine stops (the server's /health turns 503) instead of failing request after request."""
