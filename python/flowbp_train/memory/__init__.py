"""Memory planning: simulate one real training step at full size on any machine and answer "will it fit?".

``plan_memory(cfg)`` builds the family's modules from configs only (no weights), runs one
``Trainer.training_step`` and one sample step with fake tensors on the CPU, accounts every byte as the
GPU would hold it (``tracker``), replays the allocation trace through a model of PyTorch's CUDA caching
allocator (``allocator``) and, given a GPU size, names the cheapest real trainer options that make the
run fit, each simulated again. ``flowbp-train RECIPE ... --plan-memory [--gpu-memory GiB]`` prints it.
"""

from flowbp_train.memory.planner import MemoryPlan, Suggestion, plan_memory

__all__ = ["MemoryPlan", "Suggestion", "plan_memory"]
