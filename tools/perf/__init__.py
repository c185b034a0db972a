"""The parts of tools/benchmark.py; they use the emanet package and are not part of it.

- ``run``: which rows run on this machine, their processes in alternating rounds, the exports they share
  (``run_benchmark``);
- ``measure``: what each of those processes measures (latency and peak memory of eval, inference and a
  train step, the EM unit against a non-local block) and the machine (CPU, its fp32 peak);
- ``macs``: parameters and multiply-adds (Conv2D layers by forward hooks, the EM unit and a non-local
  block by their formulas);
- ``quickstart``: a trained quick-start model exported for every runtime, each path's mIoU and its labels'
  agreement with Paddle Inference fp32;
- ``report``: the rows, the speed ratios between them, and the Markdown table with its findings
  (``format_report``).

Speed and memory of EMANet on this machine: ours against PaddleSeg 2.8.0's, dygraph against exported.

``run_benchmark`` measures, for one set of random weights:

- parameters and multiply-adds (Conv2D layers by forward hooks, the EM unit by its formula);
- eval latency and peak memory of (a) our dygraph model, (b) PaddleSeg's EMANet holding the same
  weights, with glibc's default allocator, (b') the same under emanet's runtime settings
  (``emanet.device.tune_cpu_allocator``), so that model and runtime gains show apart, (c) our
  exported model through Paddle Inference with oneDNN fp32, (d) the same in bf16;
- a training step of (a), (b) and (b'), the cost of flip evaluation, and how often the variants' labels agree;
- the EM unit alone against a non-local block of the same width;
- optionally, fp32 against bf16 labels and mIoU of a trained quick-start model.

Every measurement runs in a fresh Python process, so its peak memory is its own and no variant
warms caches or allocators for the next; rounds repeat every process in alternating order.
A few rows share a process with the row they are compared with, measured after the lighter one
or on the same workload: flip evaluation (after single-scale), PaddleSeg's train step with
Paddle's default threads (before the one with --threads), and the non-local block (after the EM unit).
"""
